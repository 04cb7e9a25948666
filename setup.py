"""The one compiled part: lora_tools/io/_native.c, the fp8 rounding kernel. Optional: where no C compiler
is found the install goes on without it and lora_tools.io.fp8 rounds with torch (same bits, slower)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("lora_tools.io._native", ["lora_tools/io/_native.c"], optional=True,
                             extra_compile_args=["-O3", "-Wno-psabi"])])
