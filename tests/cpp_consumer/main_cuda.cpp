// Consumer of the installed absparse CUDA API (absparse/decode_cuda.h, absparse::absparse_cuda)
// that runs without a GPU: it links the kernels' library and calls host-only functions (workspace
// size, list capacity), then checks that an unsupported dtype is rejected on the host.
// Prints "absparse CUDA consumer OK ..." and returns 0 on success, else the failure and 1.
//
// Shapes: B = 3 sequences, Hq = 32, Hk = 8, D = 128, page size P = 64, a 512-page (32K-token)
// page table; the data pointers stay null because nothing is launched.
#include <absparse/absparse.h>
#include <absparse/decode_cuda.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

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

  // Workspace of select_blocks: one 32-bit key per block of the capacity (32K tokens / 16), per
  // (sequence, KV head), padded to 256 bytes, then one arrival counter per (sequence, KV head).
  const absparse::LayerLayout layout(std::vector<int32_t>(8, 16), 64,
                                     absparse::SummaryKind::kMinMax,
                                     absparse::SummaryFormat::kInt4c);
  absparse::SelectBlocksParams s;
  s.layout = &layout;
  s.geometry = p.geometry;
  s.num_q_heads = 32;
  const size_t workspace = absparse::select_blocks_workspace_size(s);
  const size_t keys = size_t{3} * 8 * (32768 / 16) * 4;
  const size_t expected = (keys + 255) / 256 * 256 + size_t{3} * 8 * 4;
  const int64_t capacity = absparse::max_blocks_bound(layout, 512, 2048, 0.0, 16, 64);
  if (workspace != expected || capacity != 128) {
    std::printf("absparse CUDA consumer FAILED: workspace %zu bytes (expected %zu), capacity %lld "
                "(expected 128)\n", workspace, expected, static_cast<long long>(capacity));
    return 1;
  }

  // float32 runs on the CPU only: rejected on the host with an InvalidArgument naming q, before
  // any CUDA call (so this runs without a GPU).
  p.dtype = absparse::DType::kFloat32;
  std::string message;
  try {
    absparse::check_decode_attention_cuda(p);
  } catch (const absparse::InvalidArgument& e) {
    message = e.what();
  }
  if (message.find("q") == std::string::npos || message.find("float32") == std::string::npos) {
    std::printf("absparse CUDA consumer FAILED: a float32 q did not throw an InvalidArgument "
                "naming q and float32 (message: '%s')\n", message.c_str());
    return 1;
  }
  std::printf("absparse CUDA consumer OK: select workspace %zu bytes, capacity %lld, float32 "
              "rejected\n", workspace, static_cast<long long>(capacity));
  return 0;
}
