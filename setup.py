"""Build hooks: the copier's cffi module, and Python modules generated from proto/ at build time.

``build_py`` (which ``pip install .`` and ``pip install -e .`` both run) first compiles every
``proto/**/*.proto`` with grpcio-tools and mypy-protobuf into ``host_agent/_proto/`` (gitignored), so
``proto/hyperback/v1/optimizer.proto`` becomes ``host_agent._proto.hyperback.v1.optimizer_pb2``,
``..._pb2_grpc`` and their ``.pyi`` stubs. protoc writes absolute imports rooted at ``proto/``
(``from hyperback.v1 import ...``); they are rewritten to live under ``host_agent._proto``.
"""
import re
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "host_agent" / "_proto"
OUT_PACKAGE = "host_agent._proto"


def _plugin(name):
    """A protoc plugin installed by mypy-protobuf: on PATH in pip's build env, else beside the interpreter."""
    found = shutil.which(name) or str(Path(sys.executable).with_name(name))
    return f"--plugin={name}={found}"


def generate_proto_modules():
    """Compile proto/ into OUT_DIR; return the names of the generated packages."""
    from grpc_tools import protoc  # a build requirement: imported only when building

    protos = sorted(PROTO_DIR.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    for generated in {OUT_DIR / p.relative_to(PROTO_DIR).parts[0] for p in protos}:
        shutil.rmtree(generated, ignore_errors=True)  # nothing stale from a renamed .proto
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", _plugin("protoc-gen-mypy"), _plugin("protoc-gen-mypy_grpc"),
                      f"--python_out={OUT_DIR}", f"--grpc_python_out={OUT_DIR}",
                      f"--mypy_out=quiet:{OUT_DIR}", f"--mypy_grpc_out=quiet:{OUT_DIR}", *map(str, protos)])
    if rc != 0:
        raise SystemExit(f"protoc failed on {PROTO_DIR} (exit {rc})")
    packages = set()
    for proto in protos:
        parts = proto.relative_to(PROTO_DIR).parent.parts
        for depth in range(1, len(parts) + 1):
            (OUT_DIR.joinpath(*parts[:depth]) / "__init__.py").touch()
            packages.add(".".join((OUT_PACKAGE, *parts[:depth])))
    roots = "|".join(sorted({re.escape(p.relative_to(PROTO_DIR).parts[0]) for p in protos}))
    imports = re.compile(rf"^from ({roots})([. ])", re.MULTILINE)
    module_names = re.compile(rf"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, ')({roots})\.")
    for module in (m for m in OUT_DIR.rglob("*_pb2*") if m.suffix in (".py", ".pyi")):
        text = imports.sub(rf"from {OUT_PACKAGE}.\1\2", module.read_text())
        module.write_text(module_names.sub(rf"\1{OUT_PACKAGE}.\2.", text))
    return sorted(packages)


class BuildPyWithProto(build_py):
    def run(self):
        packages = generate_proto_modules()
        self.packages = [*self.packages, *(p for p in packages if p not in self.packages)]
        for package in packages:
            self.package_data.setdefault(package, []).append("*.pyi")
        super().run()


setup(cffi_modules=["native/copier_build.py:ffibuilder"], cmdclass={"build_py": BuildPyWithProto})
