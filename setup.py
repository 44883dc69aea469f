"""Builds kvcomm._C: the C++ core (always) plus the CUDA kernels when torch has
CUDA and nvcc is present. KVCOMM_CUDA=1 forces the CUDA sources in (a compile
check on a machine without a GPU), KVCOMM_CUDA=0 leaves them out."""
import glob
import os
import sys

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("KVCOMM_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def build_flags(section: str) -> list[str]:
    """The [section] flags of cpp/build_flags.txt, which CMakeLists.txt reads too."""
    flags, current = [], None
    with open(os.path.join(ROOT, "cpp", "build_flags.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1]
            elif line and current == section:
                flags.append(line)
    return flags


# No -std flag: torch's BuildExtension adds the C++ standard its own headers need
# (C++20 for torch 2.13 and 2.14; the 2.14 headers refuse anything older), and CMake
# takes the same one from torch's CMake package.
# Extension only: hidden visibility (a Python module exports PyInit only), and -g0:
# Python's own CFLAGS carry -g, and debug info was 95% of the library (22 MB of 22.6)
# and slows every compile. -g0 (after it) drops it; KVCOMM_DEBUG=1 keeps it.
debug = os.environ.get("KVCOMM_DEBUG") == "1"
cxx_flags = build_flags("cxx") + ["-fvisibility=hidden"] + ([] if debug else ["-g0"])
nvcc_flags = build_flags("nvcc")
link_flags = [] if debug else ["-Wl,--strip-debug"]
# at::parallel_for is a header template that only runs on several threads when the
# file calling it is compiled with OpenMP (torch's parallel backend); without the flag
# every CPU kernel runs on one thread. The library then needs libgomp.so.1, which
# torch has already loaded (same soname), so there is one OpenMP runtime and
# torch.set_num_threads governs the kernels too.
if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
include_dirs = [os.path.join(ROOT, "cpp"), os.path.join(ROOT, "cpp", "include")]
cpp_sources = sources("cpp/*.cpp")
# Headers are not sources, so setuptools would not see that an edit to one makes the
# built library stale; listing them makes it rebuild (ninja then recompiles only the
# objects that include them).
headers = sources("cpp/*.h") + sources("cpp/include/kvcomm/*.h") + sources("cuda/*.cuh")

# One object directory for every build of this checkout. The editable install
# (.ci/setup.sh) would otherwise compile in a fresh temporary directory and the wheel
# build (.ci/wheel_check.sh) again in another: with this, the wheel build finds every
# object up to date and only links (about 100 s less per CI run on 2 cores), and
# re-running setup.sh rebuilds only what changed. Ninja recompiles an object whose
# command line changed, so switching torch builds (CPU/CUDA) in one checkout is safe.
# `setup.py build_ext --build-temp DIR` still overrides it.
BUILD_TEMP = os.path.join(ROOT, "build", "ext-objects")


class BuildExtInOneObjectDir(BuildExtension.with_options(use_ninja=True)):
    def finalize_options(self):
        # Set before the base class copies the `build` command's directory (which the
        # editable install points at a temporary one); None means not given explicitly.
        if self.build_temp is None:
            self.build_temp = BUILD_TEMP
        super().finalize_options()

if want_cuda():
    ext = CUDAExtension(
        "kvcomm._C",
        cpp_sources + sources("cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("KVCOMM_WITH_CUDA", "1")],
        depends=headers,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension("kvcomm._C", cpp_sources, include_dirs=include_dirs, depends=headers,
                       extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)

# KVCOMM_SKIP_EXT=1: an editable install that builds nothing and uses the library already
# built in place (python/kvcomm/_C*.so). .ci/vllm.sh sets it when the main environment built
# that library against the very torch release of the vLLM environment: a build there would
# recompile every object (the torch include paths differ), minutes on 2 cores, for the same
# library. Never for a wheel: it would have no extension.
skip_ext = os.environ.get("KVCOMM_SKIP_EXT") == "1"

setup(
    packages=find_packages("python"),
    package_dir={"": "python"},
    ext_modules=[] if skip_ext else [ext],
    cmdclass={"build_ext": BuildExtInOneObjectDir},
)
