"""The one compiled part: pipeline.avro._avro, Avro binary in C for pipeline.avro.codec. It is
optional: without a C compiler the install goes on and serde uses fastavro."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("pipeline.avro._avro", ["pipeline/avro/_avro.c"], optional=True,
                             extra_compile_args=["-O2"])])
