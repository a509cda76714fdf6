// kfac_kernels: kernel and launcher of the batched Jacobi eigensolver (see jacobi.cuh).
#include <sstream>

#include "api.h"
#include "cuda_util.cuh"
#include "dispatch.h"
#include "jacobi.cuh"

namespace kk {

constexpr int kJacobiMaxThreads = 512;

template <class T>
__global__ void __launch_bounds__(kJacobiMaxThreads) jacobi_eigh_kernel(EighParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem[];
  jacobi_body<T>(DeviceBlock{smem}, int64_t(blockIdx.x), p, smem);
}

// Threads per block: enough for the m^2 / 2 rotation items of a round without idling most of them.
inline int jacobi_threads(int n) {
  const int m = n + (n & 1);
  return m <= 32 ? 128 : (m <= 64 ? 256 : kJacobiMaxThreads);
}

void launch_jacobi_eigh(const EighCall& c) {
  check_eigh_call(c);
  if (c.batch == 0) return;
  DeviceGuard guard(c.device);
  const cudaStream_t stream = as_stream(c.stream);
  KK_FLOAT_SWITCH(c.dtype, [&] {
    const EighParams<T> p = make_eigh_params<T>(c);
    const size_t bytes = JacobiLayout::make<T>(p.n).bytes;
    const int64_t limit = device_smem_per_block_optin(c.device);
    if (int64_t(bytes) > limit) {
      std::ostringstream os;
      os << "kfac_kernels._C.jacobi_eigh: n = " << c.n << " needs " << bytes
         << " bytes of shared memory per block, device " << c.device << " allows " << limit;
      throw std::invalid_argument(os.str());
    }
    auto kernel = jacobi_eigh_kernel<T>;
    set_smem(kernel, bytes, "cudaFuncSetAttribute(jacobi_eigh_kernel)");
    kernel<<<unsigned(c.batch), jacobi_threads(p.n), bytes, stream>>>(p);
    cuda_check(cudaGetLastError(), "jacobi_eigh_kernel launch");
  });
}

int64_t max_n_jacobi(int64_t dtype, int64_t device) {
  const int64_t limit = device_smem_per_block_optin(device);
  int64_t n = 0;
  while (n < 4096 && int64_t(smem_bytes_jacobi(dtype, n + 1)) <= limit) ++n;
  return n;
}

}  // namespace kk
