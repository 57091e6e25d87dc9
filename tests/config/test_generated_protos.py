"""The committed *_pb2.py files equal what protoc generates from protos/ now."""

import pathlib

from deeplab2_kmax.protos import generate


def test_generated_code_is_fresh(tmp_path):
  written = generate.generate(tmp_path)
  committed_dir = generate.REPO_ROOT / generate.VIRTUAL_DIR
  stale = [path.name for path in written
           if path.read_bytes() != (committed_dir / path.name).read_bytes()]
  assert not stale, (f'{stale} are stale: run `python -m deeplab2_kmax.protos.generate` and '
                     'commit the result')


def test_every_proto_source_is_generated():
  sources = sorted(p.stem for p in pathlib.Path(generate.PROTO_SOURCE_DIR).glob('*.proto'))
  assert sources == sorted(generate.PROTO_NAMES)
