// kfac_kernels: device queries and build facts.
#include <sstream>

#include "api.h"
#include "cuda_util.cuh"

#ifndef KFAC_KERNELS_CUDA_ARCHS
#define KFAC_KERNELS_CUDA_ARCHS "unknown"
#endif

namespace kk {

int64_t device_smem_per_block_optin(int64_t device) {
  int value = 0;
  cuda_check(cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, int(device)),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return value;
}

std::string cuda_build_info() {
  std::ostringstream os;
  os << "archs=" << KFAC_KERNELS_CUDA_ARCHS << ";nvcc=" << __CUDACC_VER_MAJOR__ << "."
     << __CUDACC_VER_MINOR__ << ";cudart=" << CUDART_VERSION << " (static)";
  return os.str();
}

}  // namespace kk
