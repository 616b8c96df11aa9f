// The library's entry point: ONNX Runtime calls RegisterCustomOps when a session registers the library
// (SessionOptions.register_custom_ops_library), and every op of domain ai.dscompile is added.
#include "native.h"

#include <memory>
#include <vector>

namespace {

constexpr const char* kDomain = "ai.dscompile";

// Made once per process: every session the library is registered with shares the ops and their domain.
std::vector<std::unique_ptr<Ort::Custom::OrtLiteCustomOp>> g_ops;
std::unique_ptr<Ort::CustomOpDomain> g_domain;

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api) {
  const OrtApi* ort = api->GetApi(ORT_API_VERSION);
  if (ort == nullptr) return nullptr;  // a runtime older than the headers: nothing registered, the graph is refused
  Ort::InitApi(ort);
  if (!g_domain) {
    g_domain = std::make_unique<Ort::CustomOpDomain>(kDomain);
    for (auto* make : {NewExpertsQ4, NewExpertsQ8, NewHeadsMatMulQ8, NewLatentAttention, NewLinearF32, NewMatMulF32,
                       NewMatMulQ4, NewMatMulQ6, NewMatMulQ8, NewMoEF32, NewMoEQ4, NewMoEQ8,
                       NewQueryRope, NewLatentKey}) {
      g_ops.emplace_back(make());
      g_domain->Add(g_ops.back().get());
    }
  }
  Ort::UnownedSessionOptions(options).Add(*g_domain);
  return nullptr;
}
