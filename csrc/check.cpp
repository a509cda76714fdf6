// kfac_kernels: argument checks of the host API (no device is touched here).
#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

#include "api.h"
#include "cholesky.cuh"
#include "jacobi.cuh"

namespace kk {
namespace {

constexpr int64_t kMaxN = int64_t(1) << 20;
constexpr int64_t kMaxBatch = (int64_t(1) << 31) - 1;

template <class... Parts>
[[noreturn]] void fail(const char* fn, Parts&&... parts) {
  std::ostringstream os;
  os << "kfac_kernels._C." << fn << ": ";
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

int64_t elem_size(const char* fn, int64_t dtype) {
  if (dtype == kFloat32) return 4;
  if (dtype == kFloat64) return 8;
  fail(fn, "dtype code ", dtype, " is not supported (0 = float32, 1 = float64)");
}

void check_ptr(const char* fn, const char* name, int64_t ptr, int64_t align, bool required) {
  if (ptr == 0) {
    if (required) fail(fn, name, " is a null pointer");
    return;
  }
  if (ptr < 0) fail(fn, name, " = ", ptr, " is not a valid address");
  if (ptr % align != 0) fail(fn, name, " = ", ptr, " is not aligned to ", align, " bytes");
}

void check_sizes(const char* fn, int64_t batch, int64_t n) {
  if (batch < 0) fail(fn, "batch must be >= 0, got ", batch);
  if (batch > kMaxBatch) fail(fn, "batch must be < 2^31, got ", batch);
  if (n < 1) fail(fn, "n must be >= 1, got ", n);
  if (n > kMaxN) fail(fn, "n must be <= ", kMaxN, ", got ", n);
  if (batch > 0 && n * n > std::numeric_limits<int64_t>::max() / 8 / batch)
    fail(fn, "batch * n * n = ", batch, " * ", n, "^2 elements is too large");
}

void check_layout(const char* fn, const char* name, int64_t n, int64_t batch, int64_t stride_b,
                  int64_t stride_r) {
  if (stride_r < n) fail(fn, name, ": row stride (leading dimension) ", stride_r, " < n = ", n);
  if (stride_b < 0) fail(fn, name, ": batch stride must be >= 0, got ", stride_b);
  const int64_t extent = (n - 1) * stride_r + n;  // elements spanned by one matrix
  if (batch > 1 && stride_b != 0 && stride_b < extent)
    fail(fn, name, ": batch stride ", stride_b, " makes matrices overlap (one spans ", extent,
         " elements); use 0 to repeat one matrix");
}

void check_device(const char* fn, int64_t device, int64_t stream) {
  if (device < 0) fail(fn, "device index must be >= 0, got ", device);
  if (stream < 0) fail(fn, "stream must be a cudaStream_t as a non-negative integer, got ", stream);
}

}  // namespace

void check_inverse_call(const InverseCall& c) {
  const char* fn = "damped_inverse";
  const int64_t es = elem_size(fn, c.dtype);
  check_sizes(fn, c.batch, c.n);
  if (c.variant != kVariantSmem && c.variant != kVariantBlocked)
    fail(fn, "variant ", c.variant, " is not supported (0 = smem, 1 = blocked)");
  check_ptr(fn, "F", c.F, es, true);
  check_ptr(fn, "out", c.out, es, true);
  check_ptr(fn, "info", c.info, 4, true);
  check_ptr(fn, "work", c.work, es, c.variant == kVariantBlocked);
  check_ptr(fn, "gamma", c.gamma, es, false);
  check_layout(fn, "F", c.n, c.batch, c.f_stride_b, c.f_stride_r);
  if (c.gamma != 0) {
    if (c.gamma_stride != 0 && c.gamma_stride != 1)
      fail(fn, "gamma_stride must be 0 or 1, got ", c.gamma_stride);
  } else if (!(std::isfinite(c.gamma_scalar) && c.gamma_scalar >= 0.0)) {
    fail(fn, "gamma_scalar must be finite and >= 0, got ", c.gamma_scalar);
  }
  if (c.out == c.work && c.work != 0) fail(fn, "out and work must be different buffers");
  check_device(fn, c.device, c.stream);
}

void check_eigh_call(const EighCall& c) {
  const char* fn = "jacobi_eigh";
  const int64_t es = elem_size(fn, c.dtype);
  check_sizes(fn, c.batch, c.n);
  check_ptr(fn, "F", c.F, es, true);
  check_ptr(fn, "evals", c.evals, es, true);
  check_ptr(fn, "evecs", c.evecs, es, true);
  check_ptr(fn, "info", c.info, 4, true);
  check_ptr(fn, "sweeps", c.sweeps, 4, false);
  check_ptr(fn, "Q0", c.Q0, es, false);
  check_layout(fn, "F", c.n, c.batch, c.f_stride_b, c.f_stride_r);
  if (c.Q0 != 0) check_layout(fn, "Q0", c.n, c.batch, c.q_stride_b, c.q_stride_r);
  if (!(std::isfinite(c.tol) && c.tol > 0.0 && c.tol < 1.0))
    fail(fn, "tol must be in (0, 1), got ", c.tol);
  if (c.max_sweeps < 1 || c.max_sweeps > 10000)
    fail(fn, "max_sweeps must be in [1, 10000], got ", c.max_sweeps);
  if (c.n > 4096) fail(fn, "n = ", c.n, " is beyond any one-block Jacobi kernel (shared memory)");
  check_device(fn, c.device, c.stream);
}

size_t smem_bytes_inverse(int64_t dtype, bool fp64_accumulate, int64_t n, int64_t variant) {
  if (variant == kVariantBlocked) {
    return dtype == kFloat64 ? blocked_smem_bytes<double, double>()
           : fp64_accumulate ? blocked_smem_bytes<float, double>()
                             : blocked_smem_bytes<float, float>();
  }
  const int nn = int(n);
  return dtype == kFloat64 ? inverse_smem_bytes<double, double>(nn)
         : fp64_accumulate ? inverse_smem_bytes<float, double>(nn)
                           : inverse_smem_bytes<float, float>(nn);
}

size_t smem_bytes_jacobi(int64_t dtype, int64_t n) {
  return dtype == kFloat64 ? JacobiLayout::make<double>(int(n)).bytes
                           : JacobiLayout::make<float>(int(n)).bytes;
}

}  // namespace kk
