// pybind11 module kvcomm._C: AnchorPool and its value types. The ops
// themselves are reached through torch.ops.kvcomm (schemas.cpp); this is the
// only translation unit that includes torch's pybind11 headers.
// The at::Tensor <-> torch.Tensor casters without the rest of torch/python.h
// (the libtorch C++ API), which doubled this file's compile time.
#include <torch/csrc/utils/pybind.h>
#include <pybind11/stl.h>

#include <optional>

#include "cpu_kernels.h"
#include "kvcomm/anchor_pool.h"

namespace py = pybind11;
using kvcomm::AgentDeltas;
using kvcomm::AnchorPool;
using kvcomm::DistanceMode;
using kvcomm::PoolConfig;
using kvcomm::Storage;

namespace {

at::ScalarType dtype_from_name(const char* op, const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, op, ": dtype must be 'float32', 'bfloat16' or 'float16', got '", name, "'");
}

const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    default: return nullptr;
  }
}

PoolConfig make_config(double gamma, double tau, double top_p, int64_t capacity,
                       int64_t window, int64_t byte_budget, const std::string& distance,
                       int64_t layers, int64_t kv_heads, int64_t head_dim,
                       int64_t min_anchors, const std::string& storage) {
  TORCH_CHECK(distance == "frobenius" || distance == "rms",
              "PoolConfig: distance must be 'frobenius' or 'rms', got '", distance, "'");
  PoolConfig c;
  bool known = false;
  for (auto s : {Storage::kModel, Storage::kBf16, Storage::kInt8, Storage::kFp8}) {
    if (storage == kvcomm::storage_name(s)) {
      c.storage = s;
      known = true;
    }
  }
  TORCH_CHECK(known, "PoolConfig: storage must be 'model', 'bf16', 'int8' or 'fp8', got '",
              storage, "'");
  c.gamma = gamma;
  c.tau = tau;
  c.top_p = top_p;
  c.capacity = capacity;
  c.window = window;
  c.byte_budget = byte_budget;
  c.distance = distance == "rms" ? DistanceMode::kRms : DistanceMode::kFrobenius;
  c.layers = layers;
  c.kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.min_anchors = min_anchors;
  return c;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kvcomm C++ core: AnchorPool (ops are under torch.ops.kvcomm)";
  // Which build of the CPU inner loops this machine runs ("avx2" or "default"),
  // for the tests that run the portable build under ATEN_CPU_CAPABILITY=default.
  m.def("_cpu_kernel_isa", [] { return std::string(kvcomm::cpu::kernels().isa); });

  py::class_<PoolConfig>(m, "PoolConfig")
      .def(py::init(&make_config), py::arg("gamma") = 0.3, py::arg("tau") = 1.0,
           py::arg("top_p") = 0.9, py::arg("capacity") = 20, py::arg("window") = 5,
           py::arg("byte_budget") = 0, py::arg("distance") = "frobenius",
           py::arg("layers") = 0, py::arg("kv_heads") = 0, py::arg("head_dim") = 0,
           py::arg("min_anchors") = 2, py::arg("storage") = "model")
      .def_readonly("gamma", &PoolConfig::gamma)
      .def_readonly("tau", &PoolConfig::tau)
      .def_readonly("top_p", &PoolConfig::top_p)
      .def_readonly("capacity", &PoolConfig::capacity)
      .def_readonly("window", &PoolConfig::window)
      .def_readonly("byte_budget", &PoolConfig::byte_budget)
      .def_readonly("min_anchors", &PoolConfig::min_anchors)
      .def_property_readonly("storage",
                             [](const PoolConfig& c) { return kvcomm::storage_name(c.storage); })
      .def_property_readonly("distance", [](const PoolConfig& c) {
        return c.distance == DistanceMode::kRms ? "rms" : "frobenius";
      })
      .def("__repr__", [](const PoolConfig& c) {
        return "PoolConfig(gamma=" + std::to_string(c.gamma) + ", tau=" + std::to_string(c.tau) +
               ", top_p=" + std::to_string(c.top_p) + ", capacity=" + std::to_string(c.capacity) +
               ", window=" + std::to_string(c.window) +
               ", byte_budget=" + std::to_string(c.byte_budget) +
               ", min_anchors=" + std::to_string(c.min_anchors) + ", distance=" +
               (c.distance == DistanceMode::kRms ? "'rms'" : "'frobenius'") + ", storage='" +
               kvcomm::storage_name(c.storage) + "')";
      });

  py::class_<kvcomm::Decision>(m, "Decision")
      .def_readonly("share", &kvcomm::Decision::share)
      .def_readonly("reason", &kvcomm::Decision::reason)
      .def_readonly("candidates", &kvcomm::Decision::candidates)
      .def_readonly("distances", &kvcomm::Decision::distances)
      .def_readonly("probs", &kvcomm::Decision::probs)
      .def_readonly("entropy", &kvcomm::Decision::entropy)
      .def_readonly("threshold", &kvcomm::Decision::threshold)
      .def_readonly("credited", &kvcomm::Decision::credited)
      .def("__repr__", [](const kvcomm::Decision& d) {
        return "Decision(share=" + std::string(d.share ? "True" : "False") + ", reason='" +
               d.reason + "', candidates=" + std::to_string(d.candidates.size()) +
               ", entropy=" + std::to_string(d.entropy) + ")";
      });

  py::class_<kvcomm::EstimateWeights>(m, "EstimateWeights",
                                      "An estimate's anchor weights (EstimateResult.weights): pass them to "
                                      "the next agent's estimate of the same content (estimate(weights=...)).")
      .def_readonly("anchors", &kvcomm::EstimateWeights::anchors)
      .def_readonly("token_k", &kvcomm::EstimateWeights::token_k)
      .def_readonly("token_v", &kvcomm::EstimateWeights::token_v)
      .def_property_readonly("segment_k", [](const kvcomm::EstimateWeights& w) -> py::object {
        return w.segment_k.defined() ? py::cast(w.segment_k) : py::none();
      })
      .def_property_readonly("segment_v", [](const kvcomm::EstimateWeights& w) -> py::object {
        return w.segment_v.defined() ? py::cast(w.segment_v) : py::none();
      });

  py::class_<kvcomm::EstimateResult>(m, "EstimateResult")
      .def_readonly("anchors", &kvcomm::EstimateResult::anchors)
      .def_property_readonly("weights", [](const kvcomm::EstimateResult& r) -> py::object {
        return r.weights.defined() ? py::cast(r.weights) : py::none();
      })
      .def_property_readonly("spread",
                             [](const kvcomm::EstimateResult& r) -> py::object {
                               if (!r.spread.defined()) return py::none();
                               return py::cast(r.spread);
                             })
      .def_property_readonly("ok", &kvcomm::EstimateResult::ok)
      .def("__bool__", &kvcomm::EstimateResult::ok);

  py::class_<kvcomm::AnchorInfo>(m, "AnchorInfo")
      .def_readonly("id", &kvcomm::AnchorInfo::id)
      .def_readonly("length", &kvcomm::AnchorInfo::length)
      .def_readonly("activations", &kvcomm::AnchorInfo::activations)
      .def_readonly("inserted", &kvcomm::AnchorInfo::inserted)
      .def_readonly("agents", &kvcomm::AnchorInfo::agents)
      .def_readonly("bytes", &kvcomm::AnchorInfo::bytes);

  using release = py::call_guard<py::gil_scoped_release>;
  py::class_<AnchorPool, std::shared_ptr<AnchorPool>>(m, "AnchorPool")
      .def(py::init<PoolConfig>(), py::arg("config") = PoolConfig())
      .def_property_readonly("config", &AnchorPool::config)
      .def_property_readonly(
          "dtype",
          [](const AnchorPool& p) -> py::object {
            const char* name = dtype_name(p.dtype());
            return name ? py::object(py::str(name)) : py::object(py::none());
          },
          "The dtype the anchors stand for ('float32', 'bfloat16', 'float16'; None while empty).")
      .def("decide", &AnchorPool::decide, py::arg("slot"), py::arg("content_v"),
           py::arg("credit") = true, release(),
           "Share-or-anchor decision (docs/method.md, 'Deciding') for content values [L,H,n,D].")
      .def(
          "candidate_distances",
          [](const AnchorPool& p, const std::string& slot, const at::Tensor& content_v, bool rms) {
            // A C++ pair: converted to Python after the call guard gives the GIL back.
            auto c = p.candidate_distances(slot, content_v, rms);
            return std::make_pair(std::move(c.ids), std::move(c.distances));
          },
          py::arg("slot"), py::arg("content_v"), py::arg("rms") = false, release(),
          "(ids, distances): the slot's anchors at least as long as content_v [L,H,n,D], in pool\n"
          "order, and the float32 distance of content_v to each (Frobenius, or per-element RMS).\n"
          "The first half of decide, for callers that combine distances (tensor parallelism).")
      .def("decide_from_distances", &AnchorPool::decide_from_distances, py::arg("slot"),
           py::arg("ids"), py::arg("distances"), py::arg("credit") = true, release(),
           "The second half of decide: the entropy gate, coverage (min_anchors) and activation\n"
           "credit from distances to candidates `ids` (as candidate_distances gave them).")
      .def("add_anchor", &AnchorPool::add_anchor, py::arg("slot"), py::arg("base_k"),
           py::arg("base_v"), release(),
           "New anchor from neutral-frame base K/V [L,H,n,D]; returns its id.")
      .def(
          "record_deltas",
          [](AnchorPool& p, const std::string& slot, int64_t id, const std::string& agent,
             const at::Tensor& ph_k, const at::Tensor& ph_v,
             const c10::optional<at::Tensor>& seg_k, const c10::optional<at::Tensor>& seg_v) {
            AgentDeltas d{ph_k, ph_v, seg_k.value_or(at::Tensor()), seg_v.value_or(at::Tensor())};
            p.record_deltas(slot, id, agent, d);
          },
          py::arg("slot"), py::arg("id"), py::arg("agent"), py::arg("ph_k"), py::arg("ph_v"),
          py::arg("seg_k") = py::none(), py::arg("seg_v") = py::none(), release(),
          "Record an agent's neutral-frame deltas for an anchor.")
      .def(
          "estimate",
          [](const AnchorPool& p, const std::string& slot, const std::string& agent,
             const at::Tensor& base_k, const at::Tensor& base_v, const at::Tensor& inv_freq,
             int64_t position, const at::Tensor& dst_k, const at::Tensor& dst_v,
             const c10::optional<at::Tensor>& seg_template_k,
             const c10::optional<at::Tensor>& seg_template_v, int64_t seg_position,
             const c10::optional<at::Tensor>& seg_dst_k,
             const c10::optional<at::Tensor>& seg_dst_v, bool want_spread,
             const std::vector<int64_t>& nearest, int64_t limit,
             const c10::optional<kvcomm::EstimateWeights>& weights) {
            kvcomm::EstimateRequest r;
            r.base_k = base_k;
            r.base_v = base_v;
            r.inv_freq = inv_freq;
            r.position = position;
            r.dst_k = dst_k;
            r.dst_v = dst_v;
            r.seg_template_k = seg_template_k.value_or(at::Tensor());
            r.seg_template_v = seg_template_v.value_or(at::Tensor());
            r.seg_position = seg_position;
            r.seg_dst_k = seg_dst_k.value_or(at::Tensor());
            r.seg_dst_v = seg_dst_v.value_or(at::Tensor());
            r.want_spread = want_spread;
            r.nearest = nearest;
            r.limit = limit;
            if (weights) r.weights = *weights;
            return p.estimate(slot, agent, r);
          },
          py::arg("slot"), py::arg("agent"), py::arg("base_k"), py::arg("base_v"),
          py::arg("inv_freq"), py::arg("position"), py::arg("dst_k"), py::arg("dst_v"),
          py::arg("seg_template_k") = py::none(), py::arg("seg_template_v") = py::none(),
          py::arg("seg_position") = 0, py::arg("seg_dst_k") = py::none(),
          py::arg("seg_dst_v") = py::none(), py::arg("want_spread") = false,
          py::arg("nearest") = std::vector<int64_t>{}, py::arg("limit") = 0,
          py::arg("weights") = py::none(), release(),
          "Estimate (docs/method.md, 'Estimating the offset') the placeholder (and following segment) KV for an "
          "agent into dst tensors; returns the anchors used (empty: nothing written, run dense) "
          "and, with want_spread, the per-token spread of the anchors' deltas. limit > 0: at most that\n"
          "many anchors, the first of `nearest` (anchor ids, nearest first) that are usable. weights: an\n"
          "earlier estimate's (result.weights) of this content, taken when they weight the same anchors.")
      .def(
          "estimate_weights",
          [](const AnchorPool& p, const std::string& slot, const at::Tensor& base_k, const at::Tensor& base_v,
             const std::vector<int64_t>& nearest, int64_t limit) -> std::optional<kvcomm::EstimateWeights> {
            kvcomm::EstimateWeights w = p.estimate_weights(slot, base_k, base_v, nearest, limit);
            if (!w.defined()) return std::nullopt;
            return w;
          },
          py::arg("slot"), py::arg("base_k"),
           py::arg("base_v"), py::arg("nearest") = std::vector<int64_t>{}, py::arg("limit") = 0, release(),
           "The anchor weights an estimate of this content would compute, ahead of the call that\n"
           "needs them (pass them to estimate(weights=...)); None when the slot has no anchor that long.")
      .def("has_slot", &AnchorPool::has_slot)
      .def("slots", &AnchorPool::slots)
      .def("anchors", &AnchorPool::anchors, py::arg("slot"))
      .def("anchor_base", &AnchorPool::anchor_base, py::arg("slot"), py::arg("id"))
      .def(
          "anchor_deltas",
          [](const AnchorPool& p, const std::string& slot, int64_t id, const std::string& agent) {
            const AgentDeltas d = p.anchor_deltas(slot, id, agent);
            py::dict out;
            out["ph_k"] = d.ph_k;
            out["ph_v"] = d.ph_v;
            out["seg_k"] = d.seg_k.defined() ? py::cast(d.seg_k) : py::none();
            out["seg_v"] = d.seg_v.defined() ? py::cast(d.seg_v) : py::none();
            return out;
          },
          py::arg("slot"), py::arg("id"), py::arg("agent"))
      .def(
          "anchor_stored",
          [](const AnchorPool& p, const std::string& slot, int64_t id) {
            py::dict out;
            for (const auto& t : p.anchor_stored(slot, id))
              out[py::str(t.name)] =
                  py::make_tuple(t.data, t.scale.defined() ? py::cast(t.scale) : py::none());
            return out;
          },
          py::arg("slot"), py::arg("id"),
          "The anchor's tensors as stored: {name: (data, scale or None)} for base_k, base_v "
          "and '<agent>/ph_k' ... '<agent>/seg_v'.")
      .def("has_deltas", &AnchorPool::has_deltas, py::arg("slot"), py::arg("id"),
           py::arg("agent"))
      .def("size", py::overload_cast<>(&AnchorPool::size, py::const_))
      .def("slot_size", py::overload_cast<const std::string&>(&AnchorPool::size, py::const_))
      .def("__len__", py::overload_cast<>(&AnchorPool::size, py::const_))
      .def("memory_bytes", &AnchorPool::memory_bytes)
      .def_property_readonly("evictions", &AnchorPool::evictions)
      .def("clear", &AnchorPool::clear)
      .def("save", &AnchorPool::save, py::arg("path"), release())
      .def(
          "load",
          [](AnchorPool& p, const std::string& path, const std::string& device,
             const c10::optional<std::string>& dtype) {
            p.load(path, device, dtype ? dtype_from_name("AnchorPool.load", *dtype)
                                       : at::ScalarType::Undefined);
          },
          py::arg("path"), py::arg("device") = "", py::arg("dtype") = py::none(), release(),
          "Replaces the pool's contents with a saved pool (validated first; on any error the\n"
          "pool is unchanged). dtype: 'float32', 'bfloat16' or 'float16' converts the anchors\n"
          "to the model's dtype (default: keep the file's).");
}
