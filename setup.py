"""Build the native JSON lines reader; everything else is in pyproject.toml.

The reader links Debian's `libsimdjson-dev` (simdjson 3). It is optional:
where the library is missing the build goes on without it, and the `jsonl`
source parses every block with Arrow's JSON reader.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dataflare.connectors.files._jsonl_reader",
            ["dataflare/connectors/files/_jsonl_reader.cpp"],
            language="c++",
            libraries=["simdjson"],
            extra_compile_args=["-std=c++17", "-O2"],
            optional=True,
        )
    ]
)
