// kfac_kernels: small host-side CUDA helpers shared by the launchers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace kk {

inline void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("kfac_kernels._C: ") + what + ": " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
  }
}

// Makes `device` current for this runtime (the module links the CUDA runtime statically, so its
// notion of the current device is its own) and restores the previous one.
class DeviceGuard {
 public:
  explicit DeviceGuard(int64_t device) {
    cuda_check(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != int(device)) cuda_check(cudaSetDevice(int(device)), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

inline cudaStream_t as_stream(int64_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Opts a kernel into more than 48 KiB of dynamic shared memory when it needs it.
template <class Kernel>
inline void set_smem(Kernel kernel, size_t bytes, const char* name) {
  if (bytes > 48 * 1024) {
    cuda_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    int(bytes)),
               name);
  }
}

constexpr int64_t kMaxGridY = 65535;

}  // namespace kk
