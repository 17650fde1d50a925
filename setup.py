"""The one compiled part: pipeline._avro, the replay decoder's accelerator. It is optional:
without a C compiler the install goes on and pipeline.fastdecode uses its Python path."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pipeline._avro", ["pipeline/_avro.c"], optional=True,
                             extra_compile_args=["-O2"])])
