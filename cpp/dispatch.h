// The dtypes every kvcomm op accepts (see checks::kv4): float32, bfloat16 and
// float16. CPU and CUDA dispatch through this one macro, so no back end compiles
// a kernel for a dtype the argument checks reject.
#pragma once

#include <ATen/Dispatch.h>

#define KVCOMM_DISPATCH_KV_TYPES(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
