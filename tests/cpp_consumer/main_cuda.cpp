// Consumer of the installed absparse CUDA API (absparse/decode_cuda.h, absparse::absparse_cuda)
// that runs without a GPU: it links the kernels' library and calls the host-only planning
// functions, then checks that an unsupported dtype is rejected on the host, before any launch.
// Prints "absparse CUDA consumer OK ..." and returns 0 on success, else the failure and 1.
//
// Shapes: B = 3 sequences, Hq = 32, Hk = 8, D = 128, page size P = 64, a 512-page (32K-token)
// page table; the data pointers stay null because nothing is launched.
#include <absparse/absparse.h>
#include <absparse/decode_cuda.h>

#include <cstdint>
#include <cstdio>
#include <string>

int main() {
  absparse::DecodeAttentionParams p;
  p.geometry.batch = 3;
  p.geometry.num_kv_heads = 8;
  p.geometry.head_dim = 128;
  p.geometry.page_size = 64;
  p.geometry.num_pages = 3 * 512;
  p.geometry.max_pages = 512;
  p.num_q_heads = 32;
  p.dtype = absparse::DType::kBFloat16;
  p.scale = 0.08838834764831845;  // 1 / sqrt(128)

  // Workspace of a split-KV launch: [S, B, Hq, D + 1] float32 (decode_cuda.h), none for S = 1.
  const int32_t splits = absparse::decode_attention_num_splits(p);
  const size_t workspace = absparse::decode_attention_workspace_size(p);
  const size_t expected =
      splits > 1 ? static_cast<size_t>(splits) * 3 * 32 * 129 * sizeof(float) : 0;
  if (splits < 1 || workspace != expected) {
    std::printf("absparse CUDA consumer FAILED: %d splits, workspace %zu bytes (expected %zu)\n",
                splits, workspace, expected);
    return 1;
  }

  // float32 runs on the CPU only: rejected with an InvalidArgument naming q, nothing launched.
  p.dtype = absparse::DType::kFloat32;
  std::string message;
  try {
    absparse::decode_attention_cuda(p, nullptr);
  } catch (const absparse::InvalidArgument& e) {
    message = e.what();
  }
  if (message.find("q") == std::string::npos || message.find("float32") == std::string::npos) {
    std::printf("absparse CUDA consumer FAILED: a float32 q did not throw an InvalidArgument "
                "naming q and float32 (message: '%s')\n", message.c_str());
    return 1;
  }
  std::printf("absparse CUDA consumer OK: %d split(s), workspace %zu bytes, float32 rejected\n",
              splits, workspace);
  return 0;
}
