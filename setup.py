"""Build script: pure-Python package plus an optional compiled extension ``proper_kernels._C``.

PROPER_BUILD_EXT=auto (default): build the extension when torch is importable in the build environment (use
``pip install --no-build-isolation``) and a C++ compiler works; a failed build warns and installs the pure
Python package. PROPER_BUILD_EXT=1: build it or fail. PROPER_BUILD_EXT=0: never build it.
The CUDA kernels join the extension only when ``torch.version.cuda`` is set and nvcc is found.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

MODE = os.environ.get("PROPER_BUILD_EXT", "auto").lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"PROPER_BUILD_EXT must be auto, 0 or 1, got {MODE!r}")


def _log(msg):
    print(f"[proper setup] {msg}", file=sys.stderr)


def extension_setup():
    """(ext_modules, cmdclass) for the compiled extension, or ([], {}) when it is not built."""
    if MODE == "0":
        _log("PROPER_BUILD_EXT=0: skipping the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if MODE == "1":
            sys.exit("PROPER_BUILD_EXT=1 needs torch in the build environment: "
                     "pip install torch==2.13.0, then pip install --no-build-isolation .")
        _log("torch is not importable in the build environment: skipping the compiled extension "
             "(install with --no-build-isolation to build it)")
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        if MODE == "1":
            sys.exit("PROPER_BUILD_EXT=1 but no C++ compiler was found")
        _log("no C++ compiler found: skipping the compiled extension")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    rel = lambda pattern: sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, pattern)))
    sources = rel("csrc/bindings.cpp") + rel("csrc/cpu/*.cpp")
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-DNDEBUG"]  # torch 2.13 headers expect C++20
    define_macros = []
    ext_cls = cpp_extension.CppExtension
    extra = {"cxx": cxx_flags}
    with_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None \
        and os.environ.get("PROPER_BUILD_CUDA", "1") != "0"
    if with_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda_binding.cpp")
        define_macros.append(("PROPER_WITH_CUDA", "1"))
        archs = os.environ.get("PROPER_CUDA_ARCHS", "80;90")
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"] + [
            f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";")]
    _log(f"building proper_kernels._C ({'CPU + CUDA' if with_cuda else 'CPU'}) from {len(sources)} sources")
    ext = ext_cls("proper_kernels._C", sources, extra_compile_args=extra, define_macros=define_macros,
                  extra_link_args=["-fopenmp"], include_dirs=[os.path.join(here, "csrc")])

    base = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)

    class OptionalBuild(base):
        """In auto mode a failed compile leaves a working pure-Python install instead of a failed one."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001  (compiler errors come in many types)
                if MODE == "1":
                    raise
                _log(f"building the extension failed ({e}); installing without it")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                if MODE == "1":
                    raise
                _log(f"building {ext.name} failed ({e}); installing without it")

    return [ext], {"build_ext": OptionalBuild}


ext_modules, cmdclass = extension_setup()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
