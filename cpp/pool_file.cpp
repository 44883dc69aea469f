// AnchorPool save/load: a versioned binary file with a checksum, written to a
// temp file and renamed (atomic), fully parsed and validated before the live
// pool is replaced.
//
// Layout (little-endian, as the machine writes it), version 2:
//   "KVCOMMPL" u32 version u32 0
//   i64 layers heads dim, i8 dtype, i8 storage, i64 next_id next_seq, u64 slots
//   per slot:   str name, u64 anchors
//   per anchor: i64 id seq length activations, stored base_k base_v,
//               u64 agents; per agent: str name, u8 has_seg, stored ph_k ph_v
//               [seg_k seg_v]
//   u64 FNV-1a checksum of every byte before it
// str = u64 size + bytes; tensor = i8 dtype, i64 ndim, i64 sizes..., raw data;
// stored = tensor data, u8 has_scale, [tensor scale] (compact.h).
// Version 1 (still read) had no storage byte and plain tensors where version 2
// has stored ones: anchors in the model's dtype. A file whose storage differs
// from the loading pool's is converted to the pool's storage on load.
#include <ATen/ops/empty.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <ostream>
#include <utility>
#include <vector>

#include "anchor.h"

namespace kvcomm {

namespace {

constexpr char kMagic[8] = {'K', 'V', 'C', 'O', 'M', 'M', 'P', 'L'};
constexpr uint32_t kVersion = 2;
constexpr uint32_t kOldestVersion = 1;
constexpr int64_t kMaxRank = 8;

constexpr uint64_t kFnvOffset = 1469598103934665603ULL;

uint64_t fnv1a(const char* data, size_t n, uint64_t h = kFnvOffset) {
  const auto* p = reinterpret_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= p[i];
    h *= 1099511628211ULL;
  }
  return h;
}

// Streams the file: bytes go straight to the output and into the running
// checksum, so saving a pool never holds a second copy of it in memory (a
// server's pool is gigabytes; an in-memory image doubled its peak).
struct Writer {
  std::ostream& out;
  uint64_t hash = kFnvOffset;
  void bytes(const char* data, size_t n) {
    hash = fnv1a(data, n, hash);
    out.write(data, static_cast<std::streamsize>(n));
  }
  template <typename T>
  void pod(T v) {
    bytes(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void str(const std::string& s) {
    pod<uint64_t>(s.size());
    bytes(s.data(), s.size());
  }
  void tensor(const at::Tensor& t) {
    const at::Tensor c = t.to(at::kCPU).contiguous();
    pod<int8_t>(static_cast<int8_t>(c.scalar_type()));
    pod<int64_t>(c.dim());
    for (int64_t s : c.sizes()) pod<int64_t>(s);
    bytes(static_cast<const char*>(c.data_ptr()), c.nbytes());
  }
  void stored(const CompactTensor& t) {
    tensor(t.data);
    pod<uint8_t>(t.scale.defined() ? 1 : 0);
    if (t.scale.defined()) tensor(t.scale);
  }
};

struct Reader {
  const std::string& buf;
  size_t end;  // the body's end (the checksum after it is not read as data)
  size_t pos = 0;
  const std::string& path;

  void need(size_t n) {
    TORCH_CHECK(pos + n <= end, "AnchorPool.load: '", path,
                "' is truncated (needed ", n, " more bytes at offset ", pos, ")");
  }
  template <typename T>
  T pod() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, buf.data() + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string str() {
    const uint64_t n = pod<uint64_t>();
    need(n);
    std::string s = buf.substr(pos, n);
    pos += n;
    return s;
  }
  at::Tensor tensor(const at::Device& device) {
    const auto dtype = static_cast<at::ScalarType>(pod<int8_t>());
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf ||
                    dtype == at::kChar || dtype == at::kFloat8_e4m3fn,
                "AnchorPool.load: '", path, "' holds a tensor of unsupported dtype code ",
                static_cast<int>(dtype));
    const int64_t rank = pod<int64_t>();
    TORCH_CHECK(rank >= 0 && rank <= kMaxRank, "AnchorPool.load: '", path,
                "' is corrupted (tensor rank ", rank, ")");
    std::vector<int64_t> sizes(rank);
    int64_t numel = 1;
    for (auto& s : sizes) {
      s = pod<int64_t>();
      TORCH_CHECK(s >= 0 && s < (int64_t{1} << 40), "AnchorPool.load: '", path,
                  "' is corrupted (tensor size ", s, ")");
      numel *= s;
    }
    at::Tensor t = at::empty(sizes, at::TensorOptions().dtype(dtype));
    need(t.nbytes());
    std::memcpy(t.data_ptr(), buf.data() + pos, t.nbytes());
    pos += t.nbytes();
    return device.is_cpu() ? t : t.to(device);
  }
  // A stored tensor standing for `dtype`; version 1 files hold plain ones.
  CompactTensor stored(const at::Device& device, uint32_t version, at::ScalarType dtype) {
    CompactTensor t;
    t.dtype = dtype;
    t.data = tensor(device);
    if (version >= 2 && pod<uint8_t>() != 0) t.scale = tensor(device);
    return t;
  }
};

}  // namespace

// Friend of AnchorPool: reads and writes its private state.
struct PoolFile {
  // What a save writes, taken under the pool's shared lock: anchors' tensors
  // are immutable and their delta maps copy-on-write, so holding the pointers
  // is a consistent view while the bytes are written without the lock.
  struct AnchorView {
    std::shared_ptr<const AnchorPool::Anchor> anchor;
    std::shared_ptr<const DeltaMap> deltas;
    int64_t activations;
  };
  struct Snapshot {
    int64_t layers, heads, dim, next_id, next_seq;
    at::ScalarType dtype;
    Storage storage;
    std::vector<std::pair<std::string, std::vector<AnchorView>>> slots;
  };

  static Snapshot snapshot(const AnchorPool& p) {
    Snapshot s{p.layers_, p.heads_, p.dim_, p.next_id_, p.next_seq_, p.dtype_, p.config_.storage, {}};
    for (const auto& kv : p.slots_) {
      std::vector<AnchorView> anchors;
      for (const auto& a : kv.second.anchors) anchors.push_back({a, a->deltas, a->activations.load()});
      s.slots.emplace_back(kv.first, std::move(anchors));
    }
    return s;
  }

  static void write(const Snapshot& p, std::ostream& out) {
    Writer w{out};
    w.bytes(kMagic, sizeof(kMagic));
    w.pod<uint32_t>(kVersion);
    w.pod<uint32_t>(0);
    w.pod<int64_t>(p.layers);
    w.pod<int64_t>(p.heads);
    w.pod<int64_t>(p.dim);
    w.pod<int8_t>(static_cast<int8_t>(p.dtype));
    w.pod<int8_t>(static_cast<int8_t>(p.storage));
    w.pod<int64_t>(p.next_id);
    w.pod<int64_t>(p.next_seq);
    w.pod<uint64_t>(p.slots.size());
    for (const auto& kv : p.slots) {
      w.str(kv.first);
      w.pod<uint64_t>(kv.second.size());
      for (const auto& view : kv.second) {
        const auto& a = view.anchor;
        w.pod<int64_t>(a->id);
        w.pod<int64_t>(a->seq);
        w.pod<int64_t>(a->length);
        w.pod<int64_t>(view.activations);
        w.stored(a->base_k);
        w.stored(a->base_v);
        w.pod<uint64_t>(view.deltas->size());
        for (const auto& d : *view.deltas) {
          w.str(d.first);
          const bool seg = d.second.seg_k.defined();
          w.pod<uint8_t>(seg ? 1 : 0);
          w.stored(d.second.ph_k);
          w.stored(d.second.ph_v);
          if (seg) {
            w.stored(d.second.seg_k);
            w.stored(d.second.seg_v);
          }
        }
      }
    }
    const uint64_t checksum = w.hash;
    out.write(reinterpret_cast<const char*>(&checksum), sizeof(checksum));
  }

  // Decodes into `fresh` (an empty pool with the live pool's config), its
  // anchors standing for `as_dtype` (Undefined: the file's dtype).
  static void decode(const std::string& buf, const std::string& path,
                     const at::Device& device, at::ScalarType as_dtype, AnchorPool& fresh) {
    const char* op = "AnchorPool.load";
    TORCH_CHECK(buf.size() >= sizeof(kMagic) + 8 + 8 &&
                    std::memcmp(buf.data(), kMagic, sizeof(kMagic)) == 0,
                op, ": '", path, "' is not a kvcomm anchor-pool file");
    const size_t body = buf.size() - 8;
    uint64_t stored;
    std::memcpy(&stored, buf.data() + body, 8);
    Reader r{buf, body, sizeof(kMagic), path};
    const uint32_t version = r.pod<uint32_t>();
    TORCH_CHECK(version >= kOldestVersion && version <= kVersion, op, ": '", path,
                "' is format version ", version, " but this build reads versions ",
                kOldestVersion, " to ", kVersion);
    TORCH_CHECK(fnv1a(buf.data(), body) == stored, op, ": '", path,
                "' is corrupted (checksum mismatch)");
    r.pod<uint32_t>();
    const int64_t layers = r.pod<int64_t>(), heads = r.pod<int64_t>(),
                  dim = r.pod<int64_t>();
    const auto dtype = static_cast<at::ScalarType>(r.pod<int8_t>());
    const int8_t storage_code = version >= 2 ? r.pod<int8_t>() : 0;
    TORCH_CHECK(storage_code >= 0 && storage_code <= static_cast<int8_t>(Storage::kFp8), op,
                ": '", path, "' is corrupted (anchor storage code ",
                static_cast<int>(storage_code), ")");
    const auto storage = static_cast<Storage>(storage_code);
    const Storage target = fresh.config_.storage;
    // Reads one stored tensor, checks it against the file's layout and
    // storage, then holds it in the loading pool's storage.
    auto next = [&](const char* what, int64_t tokens) {
      const CompactTensor t = r.stored(device, version, dtype);
      check_stored(path, t, layers, heads, dim, dtype, storage, tokens);
      return restore_as(op, what, t, target, as_dtype);
    };
    if (fresh.layers_ > 0 && layers > 0) {
      TORCH_CHECK(layers == fresh.layers_ && heads == fresh.heads_ && dim == fresh.dim_,
                  op, ": '", path, "' holds anchors of [layers=", layers,
                  ", kv_heads=", heads, ", head_dim=", dim,
                  "] but this pool is for [layers=", fresh.layers_, ", kv_heads=",
                  fresh.heads_, ", head_dim=", fresh.dim_, "]");
    }
    const at::ScalarType held = as_dtype == at::ScalarType::Undefined ? dtype : as_dtype;
    if (fresh.dtype_ != at::ScalarType::Undefined && layers > 0) {
      TORCH_CHECK(held == fresh.dtype_, op, ": '", path, "' holds ", dtype,
                  " anchors but this pool holds ", fresh.dtype_,
                  " (load it with dtype=... to convert)");
    }
    if (layers > 0) {
      fresh.layers_ = layers;
      fresh.heads_ = heads;
      fresh.dim_ = dim;
      fresh.dtype_ = held;
    }
    fresh.next_id_ = r.pod<int64_t>();
    fresh.next_seq_ = r.pod<int64_t>();
    const uint64_t n_slots = r.pod<uint64_t>();
    for (uint64_t i = 0; i < n_slots; ++i) {
      const std::string name = r.str();
      auto& slot = fresh.slots_[name];
      const uint64_t n_anchors = r.pod<uint64_t>();
      for (uint64_t j = 0; j < n_anchors; ++j) {
        auto a = std::make_shared<AnchorPool::Anchor>();
        a->id = r.pod<int64_t>();
        a->seq = r.pod<int64_t>();
        a->length = r.pod<int64_t>();
        a->activations.store(r.pod<int64_t>());
        a->base_k = next("base_k", a->length);
        a->base_v = next("base_v", a->length);
        auto map = std::make_shared<DeltaMap>();
        const uint64_t n_agents = r.pod<uint64_t>();
        for (uint64_t k = 0; k < n_agents; ++k) {
          const std::string agent = r.str();
          const bool seg = r.pod<uint8_t>() != 0;
          StoredDeltas d;
          d.ph_k = next("ph_k", a->length);
          d.ph_v = next("ph_v", a->length);
          if (seg) {
            d.seg_k = next("seg_k", -1);
            d.seg_v = next("seg_v", d.seg_k.size(2));
          }
          (*map)[agent] = std::move(d);
        }
        a->deltas = std::move(map);
        slot.anchors.push_back(std::move(a));
      }
    }
    TORCH_CHECK(r.pos == body, op, ": '", path,
                "' is corrupted (", body - r.pos, " trailing bytes)");
  }

  static void check_stored(const std::string& path, const CompactTensor& t, int64_t layers,
                           int64_t heads, int64_t dim, at::ScalarType dtype, Storage storage,
                           int64_t tokens) {
    const at::Tensor& d = t.data;
    const at::ScalarType want = storage_dtype(storage, dtype);
    TORCH_CHECK(d.dim() == 4 && d.size(0) == layers && d.size(1) == heads &&
                    d.size(3) == dim && d.scalar_type() == want &&
                    (tokens < 0 || d.size(2) == tokens),
                "AnchorPool.load: '", path, "' is corrupted (tensor of shape ", d.sizes(),
                " and dtype ", d.scalar_type(), " in a pool of [", layers, ", ", heads, ", ",
                tokens, ", ", dim, "] ", want, ")");
    const bool scaled = storage_has_scale(storage);
    TORCH_CHECK(t.scale.defined() == scaled, "AnchorPool.load: '", path,
                "' is corrupted (", scaled ? "missing" : "unexpected", " scales for ",
                storage_name(storage), " storage)");
    if (scaled) {
      const at::Tensor& s = t.scale;
      TORCH_CHECK(s.dim() == 4 && s.size(0) == layers && s.size(1) == heads && s.size(2) == 1 &&
                      s.size(3) == dim && s.scalar_type() == at::kFloat,
                  "AnchorPool.load: '", path, "' is corrupted (scale of shape ", s.sizes(),
                  " and dtype ", s.scalar_type(), ")");
    }
  }
};

void AnchorPool::save(const std::string& path) const {
  PoolFile::Snapshot snap;
  {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    snap = PoolFile::snapshot(*this);
  }
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    TORCH_CHECK(out.good(), "AnchorPool.save: cannot write '", tmp, "'");
    PoolFile::write(snap, out);
    out.flush();
    TORCH_CHECK(out.good(), "AnchorPool.save: writing '", tmp, "' failed");
  }
  TORCH_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0,
              "AnchorPool.save: cannot rename '", tmp, "' to '", path, "'");
}

void AnchorPool::load(const std::string& path, const std::string& device,
                      at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::ScalarType::Undefined || dtype == at::kFloat ||
                  dtype == at::kBFloat16 || dtype == at::kHalf,
              "AnchorPool.load: dtype must be float32, bfloat16 or float16, got ", dtype);
  // One copy of the file in memory (read in place; the pool's tensors are made from it).
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  TORCH_CHECK(in.good(), "AnchorPool.load: cannot open '", path, "'");
  const std::streamoff size = in.tellg();
  TORCH_CHECK(size >= 0, "AnchorPool.load: cannot read '", path, "'");
  std::string buf(static_cast<size_t>(size), '\0');
  in.seekg(0);
  in.read(buf.data(), size);
  TORCH_CHECK(in.good() || in.gcount() == size, "AnchorPool.load: reading '", path, "' failed");
  const at::Device dev = device.empty() ? at::Device(at::kCPU) : at::Device(device);
  AnchorPool fresh(config_);
  {
    std::shared_lock<std::shared_mutex> lock(mutex_);
    fresh.layers_ = layers_;
    fresh.heads_ = heads_;
    fresh.dim_ = dim_;
    fresh.dtype_ = dtype_;
  }
  PoolFile::decode(buf, path, dev, dtype, fresh);
  std::unique_lock<std::shared_mutex> lock(mutex_);
  slots_ = std::move(fresh.slots_);
  layers_ = fresh.layers_;
  heads_ = fresh.heads_;
  dim_ = fresh.dim_;
  dtype_ = fresh.dtype_;
  next_id_ = fresh.next_id_;
  next_seq_ = fresh.next_seq_;
  for (auto& kv : slots_) evict_for_capacity_locked(kv.second);
  enforce_budget_locked(nullptr, 0);
}

}  // namespace kvcomm
