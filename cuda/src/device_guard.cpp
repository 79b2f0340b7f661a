// absparse::CudaDeviceGuard (absparse/decode_cuda.h): the launchers run on the current device.
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#include "absparse/decode_cuda.h"

namespace absparse {

CudaDeviceGuard::CudaDeviceGuard(int device) {
  int current = 0;
  cudaError_t err = cudaGetDevice(&current);
  if (err == cudaSuccess && current != device) {
    err = cudaSetDevice(device);
    if (err == cudaSuccess) previous_ = current;
  }
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("absparse CUDA error: cannot make device ") +
                             std::to_string(device) + " current: " + cudaGetErrorString(err));
  }
}

CudaDeviceGuard::~CudaDeviceGuard() {
  if (previous_ >= 0) cudaSetDevice(previous_);
}

}  // namespace absparse
