"""The one compiled part: pipeline._avro, Avro binary in C for pipeline.codec. It is
optional: without a C compiler the install goes on and serde uses fastavro."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pipeline._avro", ["pipeline/_avro.c"], optional=True,
                             extra_compile_args=["-O2"])])
