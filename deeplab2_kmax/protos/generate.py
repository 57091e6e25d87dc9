"""Regenerates the Python protobuf modules from the sources in `protos/`.

Users never run this: the generated `*_pb2.py` files are committed. Developers who edit a
`.proto` file run

    python -m deeplab2_kmax.protos.generate

which needs `grpcio-tools` (a test dependency). tests/config/test_generated_protos.py
regenerates into a temporary folder and fails if the committed files are stale.

The sources are mapped to the virtual path `deeplab2_kmax/protos/`, so imports between them
become package imports (`from deeplab2_kmax.protos import model_pb2`) and the descriptor-pool
names cannot clash with other libraries' `model.proto`.
"""

import os
import pathlib
import subprocess
import sys

VIRTUAL_DIR = 'deeplab2_kmax/protos'
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO_SOURCE_DIR = REPO_ROOT / 'protos'
PROTO_NAMES = ('config', 'dataset', 'evaluator', 'export', 'model', 'trainer')


def generate(output_root: pathlib.Path) -> list[pathlib.Path]:
  """Writes `<output_root>/deeplab2_kmax/protos/<name>_pb2.py` for every source.

  Returns:
    The paths written.
  """
  (output_root / VIRTUAL_DIR).mkdir(parents=True, exist_ok=True)
  # A separate process: grpc_tools' compiler extension crashes when loaded into a process that
  # already holds TensorFlow's copy of the protobuf C++ library.
  command = [
      sys.executable, '-m', 'grpc_tools.protoc',
      f'--proto_path={VIRTUAL_DIR}={PROTO_SOURCE_DIR}',
      f'--python_out={output_root}',
  ] + [f'{VIRTUAL_DIR}/{name}.proto' for name in PROTO_NAMES]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f'protoc failed on {PROTO_SOURCE_DIR} (is grpcio-tools installed?): '
                       f'{result.stderr.strip()}')
  return [output_root / VIRTUAL_DIR / f'{name}_pb2.py' for name in PROTO_NAMES]


def main() -> int:
  written = generate(REPO_ROOT)
  for path in written:
    print(os.path.relpath(path, REPO_ROOT))
  return 0


if __name__ == '__main__':
  sys.exit(main())
