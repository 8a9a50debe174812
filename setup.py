"""Build of rocket: the pure-Python package `rocket` (kernels included, as `rocket.kernels`) plus the
C++/CUDA extension `rocket._C`.

The extension always gets its C++ (OpenMP) sources; its CUDA sources join when the installed torch
has CUDA and nvcc is found (CUDA_HOME).
"""
import glob
import os

from setuptools import find_packages, setup

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch


def extension():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cuda = sorted(glob.glob("csrc/*.cu"))
    openmp = ["-fopenmp"]
    cxx = ["-O3", "-std=c++17", *openmp]
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None \
        and os.environ.get("ROCKET_NO_CUDA", "0") != "1"
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        return CUDAExtension("rocket._C", cpp + cuda, extra_compile_args={"cxx": cxx + ["-DROCKET_WITH_CUDA"],
                                                                           "nvcc": nvcc + ["-DROCKET_WITH_CUDA"]},
                             extra_link_args=openmp)
    return CppExtension("rocket._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)


setup(
    packages=find_packages(include=["rocket", "rocket.*"]),
    package_data={"rocket": ["configs/*.json"]},  # the shipped DeepSpeed ZeRO-2/3 configs
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
