"""Build of fer-kernels' C++/CUDA extension, fer_kernels._C.

The extension is built against the torch that is already installed, so install torch first and then
this package without build isolation:

    pip install --no-build-isolation -e .

Switches (environment variables):
    FER_KERNELS_EXTENSION=auto|1|0  auto (default): build the extension, and if the compiler fails install the
                                    pure-Python package, which falls back to the reference ops with a
                                    warning; 1: a failed build is an error; 0: do not build it. Without an
                                    importable torch (pip's build isolation) the install stops, except with 0.
    FER_KERNELS_CUDA=auto|1|0       auto (default): add the CUDA kernels when torch has CUDA and nvcc is
                                    found (CUDA_HOME); 1: require them; 0: CPU kernels only.
    TORCH_CUDA_ARCH_LIST            GPU architectures; defaults to the visible GPU, else "8.0;9.0+PTX".
"""

import glob
import os
import sys
import warnings

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


def _switch(name):
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"setup.py: {name} must be auto, 0 or 1, got {value!r}")
    return value


def _pip_cuda_include_dirs():
    """Header folders of pip's nvidia-* packages (cuBLAS, cuSPARSE, ...), which ATen's CUDA headers include
    and which a minimal CUDA toolkit may lack."""
    dirs = []
    for entry in sys.path:
        dirs += glob.glob(os.path.join(entry, "nvidia", "*", "include"))
    return sorted(set(dirs))


def _extension():
    ext_mode = _switch("FER_KERNELS_EXTENSION")
    cuda_mode = _switch("FER_KERNELS_CUDA")
    if ext_mode == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # Most often pip's build isolation (a plain `pip install .`): the extension would be missing and the
        # package about 6x slower on the CPU, so stop and say what to do instead of installing that quietly.
        sys.exit("setup.py: fer-kernels compiles its C++/CUDA extension against the torch that will run it, and "
                 "torch cannot be imported in this build environment. Install torch first, then this package "
                 "without build isolation:\n    pip install torch && pip install --no-build-isolation .\n"
                 "(FER_KERNELS_EXTENSION=0 installs the pure-Python package without the fused CPU kernels.)")

    have_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if cuda_mode == "1" and not have_cuda:
        sys.exit(f"setup.py: FER_KERNELS_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
                 f"CUDA_HOME={cpp_extension.CUDA_HOME!r}: install a CUDA build of torch and set CUDA_HOME to the "
                 "toolkit that has nvcc")
    with_cuda = have_cuda and cuda_mode != "0"

    sources = ["csrc/bindings.cpp", "csrc/cpu/batch_norm_act.cpp", "csrc/cpu/max_pool.cpp", "csrc/cpu/mish.cpp",
               "csrc/cpu/recalibrate.cpp", "csrc/cpu/optim.cpp", "csrc/cpu/augment.cpp", "csrc/cpu/fmix_mix.cpp"]
    # No -std: torch.utils.cpp_extension adds the standard the installed torch needs (C++17 or C++20).
    # -fno-math-errno: sqrt need not set errno, so loops that take one vectorise.
    # -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC will not
    # turn the branches of Mish and the block tail into vector blends on AVX2 (only AVX-512's masked instructions
    # let it), so on AVX2-only CPUs those loops stayed scalar (Mish 5-6x slower). Element-wise results keep their
    # bits; the gate gradient's `omp simd` sum now adds in vector lanes on AVX2 as it already did on AVX-512.
    # -fopenmp: at::parallel_for is an inline header over OpenMP in torch's Linux builds; compiled without
    # it, every CPU kernel ran on one thread (measured: CPU time = wall time at 2 threads).
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -g0: Python's own build flags ask for debug information, which nearly doubled the time to compile each file
    # (torch's headers) and made the extension 33 MB instead of 10.
    cxx = ["-O3", "-g0", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math"] + openmp
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    if with_cuda:
        sources += ["csrc/cuda/mish.cu", "csrc/cuda/recalibrate.cu", "csrc/cuda/optim.cu"]
        cxx.append("-DFER_KERNELS_WITH_CUDA")
        nvcc.append("-DFER_KERNELS_WITH_CUDA")
        if "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        if not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cublas_v2.h")):
            extra = _pip_cuda_include_dirs()
            os.environ["CPATH"] = os.pathsep.join(filter(None, [os.environ.get("CPATH", "")] + extra))
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    print(f"setup.py: building fer_kernels._C with {'CPU and CUDA' if with_cuda else 'CPU'} kernels")
    ext = ext_cls("fer_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                  extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=openmp)

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class BuildExtension(base):
        def run(self):
            try:
                super().run()
            except Exception as err:  # noqa: BLE001 - any build failure means "no extension" in auto mode
                if ext_mode == "1":
                    raise
                warnings.warn(f"fer_kernels._C failed to build ({err}); installing without it. The package falls "
                              "back to the plain-PyTorch reference (and Triton on GPUs). Set "
                              "FER_KERNELS_EXTENSION=1 to see the full error.")

    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass or {"build_ext": build_ext})
