// kfac_kernels: kernels and launcher of the batched damped Cholesky inverse (see cholesky.cuh).
#include <algorithm>
#include <sstream>

#include "api.h"
#include "cholesky.cuh"
#include "cuda_util.cuh"
#include "dispatch.h"

namespace kk {

constexpr int kInverseThreads = 256;

template <class T, class Acc>
__global__ void __launch_bounds__(kInverseThreads) inverse_smem_kernel(InverseParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  inverse_smem_body<T, Acc>(DeviceBlock{nullptr}, int64_t(blockIdx.x), p, smem);
}

template <class T>
__global__ void __launch_bounds__(kTileThreads) blocked_init_kernel(InverseParams<T> p, int64_t b0) {
  blocked_init_body<T>(DeviceBlock{nullptr}, b0 + blockIdx.y, int(blockIdx.x), p);
}

template <class T, class Acc>
__global__ void __launch_bounds__(kTileThreads)
    blocked_potrf_kernel(InverseParams<T> p, int64_t b0, int k) {
  extern __shared__ __align__(16) unsigned char smem[];
  blocked_potrf_body<T, Acc>(DeviceBlock{nullptr}, b0 + blockIdx.y, k, p, smem);
}

template <class T, class Acc>
__global__ void __launch_bounds__(kTileThreads)
    blocked_trsm_kernel(InverseParams<T> p, int64_t b0, int k) {
  extern __shared__ __align__(16) unsigned char smem[];
  blocked_trsm_body<T, Acc>(DeviceBlock{nullptr}, b0 + blockIdx.y, k, int(blockIdx.x), p, smem);
}

template <class T, class Acc>
__global__ void __launch_bounds__(kTileThreads)
    blocked_syrk_kernel(InverseParams<T> p, int64_t b0, int k) {
  extern __shared__ __align__(16) unsigned char smem[];
  blocked_syrk_body<T, Acc>(DeviceBlock{nullptr}, b0 + blockIdx.y, k, int(blockIdx.x), p, smem);
}

template <class T, class Acc>
__global__ void __launch_bounds__(kTileThreads)
    blocked_trtri_kernel(InverseParams<T> p, int64_t b0, int d) {
  extern __shared__ __align__(16) unsigned char smem[];
  blocked_trtri_body<T, Acc>(DeviceBlock{nullptr}, b0 + blockIdx.y, d, int(blockIdx.x), p, smem);
}

template <class T, class Acc>
__global__ void __launch_bounds__(kTileThreads) blocked_lauum_kernel(InverseParams<T> p, int64_t b0) {
  extern __shared__ __align__(16) unsigned char smem[];
  blocked_lauum_body<T, Acc>(DeviceBlock{nullptr}, b0 + blockIdx.y, int(blockIdx.x), p, smem);
}

namespace {

// Launches one step of the blocked variant for every matrix, in chunks of kMaxGridY matrices.
template <class T, class Acc>
struct DeviceBlockedExec {
  InverseParams<T> p;
  int64_t batch;
  cudaStream_t stream;
  size_t smem = blocked_smem_bytes<T, Acc>();

  template <class Kernel, class... Args>
  void launch(Kernel kernel, int grid, const char* name, Args... args) {
    for (int64_t b0 = 0; b0 < batch; b0 += kMaxGridY) {
      const dim3 g(unsigned(grid), unsigned(std::min<int64_t>(batch - b0, kMaxGridY)));
      kernel<<<g, kTileThreads, smem, stream>>>(p, b0, args...);
      cuda_check(cudaGetLastError(), name);
    }
  }
  void init(int grid) { launch(blocked_init_kernel<T>, grid, "blocked_init_kernel launch"); }
  void potrf(int k) { launch(blocked_potrf_kernel<T, Acc>, 1, "blocked_potrf_kernel launch", k); }
  void trsm(int k, int grid) {
    launch(blocked_trsm_kernel<T, Acc>, grid, "blocked_trsm_kernel launch", k);
  }
  void syrk(int k, int grid) {
    launch(blocked_syrk_kernel<T, Acc>, grid, "blocked_syrk_kernel launch", k);
  }
  void trtri(int d, int grid) {
    launch(blocked_trtri_kernel<T, Acc>, grid, "blocked_trtri_kernel launch", d);
  }
  void lauum(int grid) { launch(blocked_lauum_kernel<T, Acc>, grid, "blocked_lauum_kernel launch"); }
};

}  // namespace

void launch_damped_inverse(const InverseCall& c) {
  check_inverse_call(c);
  if (c.batch == 0) return;
  DeviceGuard guard(c.device);
  const cudaStream_t stream = as_stream(c.stream);
  KK_FLOAT_ACC_SWITCH(c.dtype, c.fp64_accumulate, [&] {
    const InverseParams<T> p = make_inverse_params<T>(c);
    if (c.variant == kVariantSmem) {
      const size_t bytes = inverse_smem_bytes<T, Acc>(p.n);
      const int64_t limit = device_smem_per_block_optin(c.device);
      if (int64_t(bytes) > limit) {
        std::ostringstream os;
        os << "kfac_kernels._C.damped_inverse: n = " << c.n << " needs " << bytes
           << " bytes of shared memory per block, device " << c.device << " allows " << limit
           << "; use the blocked variant";
        throw std::invalid_argument(os.str());
      }
      auto kernel = inverse_smem_kernel<T, Acc>;
      set_smem(kernel, bytes, "cudaFuncSetAttribute(inverse_smem_kernel)");
      kernel<<<unsigned(c.batch), kInverseThreads, bytes, stream>>>(p);
      cuda_check(cudaGetLastError(), "inverse_smem_kernel launch");
    } else {
      DeviceBlockedExec<T, Acc> ex{p, c.batch, stream};
      blocked_sequence(p.n, ex);
    }
  });
}

int64_t max_n_inverse_smem(int64_t dtype, bool fp64_accumulate, int64_t device) {
  const int64_t limit = device_smem_per_block_optin(device);
  int64_t n = 0;
  while (n < 4096 && int64_t(smem_bytes_inverse(dtype, fp64_accumulate, n + 1, kVariantSmem)) <= limit)
    ++n;
  return n;
}

}  // namespace kk
