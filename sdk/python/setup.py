"""Generates `sluice_client/_proto/` from the repository's `proto/` while building.

Nothing generated is committed: `pip install sdk/python` runs grpcio-tools here. The proto is
compiled under the package's own path, so the generated modules import each other as
`sluice_client._proto...` (the gRPC package and service names stay `sluice.v1.Inference`).
"""

import os
import shutil
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
PROTO = Path(os.environ.get("SLUICE_PROTO_DIR", HERE.parent.parent / "proto"))
SOURCE = PROTO / "sluice" / "v1" / "inference.proto"


def generate(out: Path) -> None:
    from grpc_tools import protoc

    if not SOURCE.exists():
        raise RuntimeError(f"{SOURCE} not found: build from the Sluice repository or set SLUICE_PROTO_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "sluice_client" / "_proto"
        staged.mkdir(parents=True)
        shutil.copy(SOURCE, staged / "inference.proto")
        args = [
            "grpc_tools.protoc",
            f"-I{tmp}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(staged / "inference.proto"),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("grpc_tools.protoc failed on " + str(SOURCE))
    (out / "sluice_client" / "_proto" / "__init__.py").write_text("")


class BuildWithProtos(build_py):
    def run(self):
        super().run()
        generate(Path(self.build_lib))


setup(cmdclass={"build_py": BuildWithProtos})
