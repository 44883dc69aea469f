// Definitions of the template launch functions of kernel_launch.cuh and the
// macros that instantiate them, one kernel family and code type at a time.
// Each launch_<codes>.cu instantiates one code type (kvcomm/codes.h): nvcc
// compiles the instantiations of one translation unit one after another, so
// the code types in separate files build in parallel (MAX_JOBS).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "kernel_launch.cuh"

namespace kvcomm {
namespace cuda {

template <typename T, Codes C, bool kVec, bool kRotate>
cudaError_t launch_offset(const Launch& g, const OffsetArgs& a, const RefTable& table,
                          const ScaleTable& scales, cudaStream_t stream) {
  return launch_kernel(offset_kernel<T, C, kVec, kRotate>, g, stream, a, table, scales);
}

template <typename T, Codes C, bool kVec, int NMAX>
cudaError_t launch_distances(const Launch& g, const DistanceArgs& a, const RefTable& table,
                             const ScaleTable& scales, cudaStream_t stream) {
  return launch_kernel(distance_kernel<T, C, kVec, NMAX>, g, stream, a, table, scales);
}

template <typename T, Codes C, bool kVec, int NMAX>
cudaError_t launch_token_scores(const Launch& g, const TokenArgs& a, const RefTable& table,
                                const ScaleTable& scales, cudaStream_t stream) {
  return launch_kernel(token_score_kernel<T, C, kVec, NMAX>, g, stream, a, table, scales);
}

template <typename T, Codes C, int NMAX>
cudaError_t launch_segment_scores(const Launch& g, const SegmentArgs& a, const RefTable& table,
                                  const ScaleTable& scales, cudaStream_t stream) {
  return launch_kernel(segment_score_kernel<T, C, NMAX>, g, stream, a, table, scales);
}

}  // namespace cuda
}  // namespace kvcomm

// One instantiation of each launch function (in namespace kvcomm::cuda).
#define KVCOMM_INSTANTIATE_OFFSET(T, C, VEC, ROT)                                           \
  template cudaError_t launch_offset<T, C, VEC, ROT>(const Launch&, const OffsetArgs&,      \
                                                     const RefTable&, const ScaleTable&,    \
                                                     cudaStream_t);
#define KVCOMM_INSTANTIATE_DISTANCES(T, C, VEC, NMAX)                                        \
  template cudaError_t launch_distances<T, C, VEC, NMAX>(const Launch&, const DistanceArgs&, \
                                                         const RefTable&, const ScaleTable&, \
                                                         cudaStream_t);
#define KVCOMM_INSTANTIATE_TOKEN(T, C, VEC, NMAX)                                            \
  template cudaError_t launch_token_scores<T, C, VEC, NMAX>(const Launch&, const TokenArgs&, \
                                                            const RefTable&,                \
                                                            const ScaleTable&, cudaStream_t);
#define KVCOMM_INSTANTIATE_SEGMENT(T, C, NMAX)                                              \
  template cudaError_t launch_segment_scores<T, C, NMAX>(const Launch&, const SegmentArgs&, \
                                                         const RefTable&, const ScaleTable&, \
                                                         cudaStream_t);

// The fused offset: both paths (vector, strided), with and without rotation.
#define KVCOMM_INSTANTIATE_OFFSET_PATHS(T, C)   \
  KVCOMM_INSTANTIATE_OFFSET(T, C, false, false) \
  KVCOMM_INSTANTIATE_OFFSET(T, C, false, true)  \
  KVCOMM_INSTANTIATE_OFFSET(T, C, true, false)  \
  KVCOMM_INSTANTIATE_OFFSET(T, C, true, true)

// Plain anchors: score launches of up to 8 or kMaxParamRefs anchors, segment
// launches of up to 8 or kSegmentChunk (launchers.cuh score_chunks).
#define KVCOMM_INSTANTIATE_PLAIN(T)                                  \
  KVCOMM_INSTANTIATE_OFFSET_PATHS(T, Codes::kPlain)                  \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kPlain, false, 8)           \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kPlain, true, 8)            \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kPlain, false, kMaxParamRefs) \
  KVCOMM_INSTANTIATE_DISTANCES(T, Codes::kPlain, true, kMaxParamRefs)  \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kPlain, false, 8)               \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kPlain, true, 8)                \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kPlain, false, kMaxParamRefs)   \
  KVCOMM_INSTANTIATE_TOKEN(T, Codes::kPlain, true, kMaxParamRefs)    \
  KVCOMM_INSTANTIATE_SEGMENT(T, Codes::kPlain, 8)                    \
  KVCOMM_INSTANTIATE_SEGMENT(T, Codes::kPlain, kSegmentChunk)

// Compact anchors (int8 / fp8 codes): kCompactChunk anchors per score launch.
#define KVCOMM_INSTANTIATE_COMPACT(T, C)                     \
  KVCOMM_INSTANTIATE_OFFSET_PATHS(T, C)                      \
  KVCOMM_INSTANTIATE_DISTANCES(T, C, false, kCompactChunk)   \
  KVCOMM_INSTANTIATE_DISTANCES(T, C, true, kCompactChunk)    \
  KVCOMM_INSTANTIATE_TOKEN(T, C, false, kCompactChunk)       \
  KVCOMM_INSTANTIATE_TOKEN(T, C, true, kCompactChunk)        \
  KVCOMM_INSTANTIATE_SEGMENT(T, C, kCompactChunk)

// Every launch of plain anchors, and of code type C (Codes::kInt8,
// Codes::kFp8), for the three dtypes.
#define KVCOMM_INSTANTIATE_PLAIN_DTYPES()   \
  namespace kvcomm {                       \
  namespace cuda {                         \
  KVCOMM_INSTANTIATE_PLAIN(float)          \
  KVCOMM_INSTANTIATE_PLAIN(c10::Half)      \
  KVCOMM_INSTANTIATE_PLAIN(c10::BFloat16)  \
  }                                        \
  }
#define KVCOMM_INSTANTIATE_COMPACT_DTYPES(C)             \
  namespace kvcomm {                                    \
  namespace cuda {                                      \
  KVCOMM_INSTANTIATE_COMPACT(float, C)                  \
  KVCOMM_INSTANTIATE_COMPACT(c10::Half, C)              \
  KVCOMM_INSTANTIATE_COMPACT(c10::BFloat16, C)          \
  }                                                     \
  }
