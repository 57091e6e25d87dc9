"""Downloads against a local HTTP server: resume, checksums, errors, cache, safe extraction."""

import hashlib
import http.server
import io
import json
import os
import socket
import tarfile
import threading

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.model_zoo import download
from deeplab2_kmax.model_zoo import registry


class _Handler(http.server.BaseHTTPRequestHandler):
  """Serves server.files; honours Range; cuts the first `server.cut_after` responses."""

  def do_GET(self):  # pylint: disable=invalid-name
    server = self.server
    server.requests.append((self.path, self.headers.get('Range')))
    body = server.files.get(self.path)
    if body is None:
      self.send_error(404, 'Not Found')
      return
    start = 0
    if self.headers.get('Range'):
      start = int(self.headers['Range'].split('=')[1].rstrip('-'))
      if start >= len(body):
        self.send_error(416, 'Range Not Satisfiable')
        return
      self.send_response(206)
      self.send_header('Content-Range', f'bytes {start}-{len(body) - 1}/{len(body)}')
    else:
      self.send_response(200)
    self.send_header('Content-Length', str(len(body) - start))
    self.end_headers()
    if server.cuts_left > 0:
      server.cuts_left -= 1
      # Half of what was announced, then the connection drops.
      self.wfile.write(body[start:start + (len(body) - start) // 2])
      self.wfile.flush()
      self.close_connection = True
      self.connection.shutdown(socket.SHUT_RDWR)
      return
    self.wfile.write(body[start:])

  def log_message(self, *args):  # Keep test output quiet.
    pass


@pytest.fixture
def server():
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  httpd.files, httpd.requests, httpd.cuts_left = {}, [], 0
  thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                            daemon=True)
  thread.start()
  httpd.url = f'http://127.0.0.1:{httpd.server_address[1]}'
  yield httpd
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
  root = tmp_path / 'cache'
  monkeypatch.setenv(download.CACHE_ENV, str(root))
  return root


def _payload(size=300_000, seed=0):
  return np.random.RandomState(seed).bytes(size)


def _closed_port_url():
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  return f'http://127.0.0.1:{port}/file.tar.gz'


def test_cache_dir_follows_the_environment(cache):
  assert download.cache_dir() == cache


def test_normal_download_records_digest_and_renames_atomically(server, tmp_path, caplog):
  body = _payload()
  server.files['/a.bin'] = body
  destination = tmp_path / 'a.bin'
  result = download.download(server.url + '/a.bin', destination, show_progress=False)
  assert result == destination and destination.read_bytes() == body
  assert not (tmp_path / 'a.bin.partial').exists()
  record = (tmp_path / 'a.bin.sha256').read_text().strip()
  assert record == hashlib.sha256(body).hexdigest()
  assert 'has no sha256' in caplog.text
  assert server.requests == [('/a.bin', None)]


def test_progress_bar_reports_bytes(server, tmp_path, capsys):
  server.files['/a.bin'] = _payload(50_000)
  download.download(server.url + '/a.bin', tmp_path / 'a.bin', show_progress=True)
  assert '50000/50000 bytes' in capsys.readouterr().err


def test_resume_after_a_cut_connection(server, tmp_path):
  body = _payload()
  server.files['/a.bin'] = body
  server.cuts_left = 1
  destination = tmp_path / 'a.bin'
  download.download(server.url + '/a.bin', destination, sha256=hashlib.sha256(body).hexdigest(),
                    show_progress=False)
  assert destination.read_bytes() == body
  # The second request asks only for the bytes the first one did not deliver.
  assert server.requests == [('/a.bin', None), ('/a.bin', f'bytes={len(body) // 2}-')]


def test_resume_of_a_partial_file_left_by_an_earlier_run(server, tmp_path):
  body = _payload()
  server.files['/a.bin'] = body
  (tmp_path / 'a.bin.partial').write_bytes(body[:1000])
  download.download(server.url + '/a.bin', tmp_path / 'a.bin', show_progress=False)
  assert (tmp_path / 'a.bin').read_bytes() == body
  assert server.requests == [('/a.bin', 'bytes=1000-')]


def test_checksum_mismatch_is_refused_and_the_partial_file_removed(server, tmp_path):
  server.files['/a.bin'] = _payload()
  with pytest.raises(download.ChecksumMismatchError, match='sha256'):
    download.download(server.url + '/a.bin', tmp_path / 'a.bin', sha256='0' * 64,
                      show_progress=False)
  assert sorted(os.listdir(tmp_path)) == []


def test_recorded_digest_guards_later_downloads(server, tmp_path):
  server.files['/a.bin'] = _payload(seed=0)
  destination = tmp_path / 'a.bin'
  download.download(server.url + '/a.bin', destination, show_progress=False)
  destination.unlink()
  server.files['/a.bin'] = _payload(seed=1)  # The file changed upstream.
  with pytest.raises(download.ChecksumMismatchError, match='recorded'):
    download.download(server.url + '/a.bin', destination, show_progress=False)
  assert not destination.exists() and not (tmp_path / 'a.bin.partial').exists()


def test_http_404_is_a_clear_error(server, tmp_path):
  with pytest.raises(download.DownloadError, match='HTTP 404'):
    download.download(server.url + '/missing.tar.gz', tmp_path / 'x', show_progress=False)
  assert not list(tmp_path.iterdir())


def test_no_network_is_a_clear_error(tmp_path):
  with pytest.raises(download.DownloadError, match='cannot connect.*without network access'):
    download.download(_closed_port_url(), tmp_path / 'x', show_progress=False, timeout=5)


def _tar_bytes(add_members):
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:gz') as archive:
    add_members(archive)
  return buffer.getvalue()


def _add_file(archive, name, data=b'weights'):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  archive.addfile(info, io.BytesIO(data))


def _add_link(archive, name, target, kind=tarfile.SYMTYPE):
  info = tarfile.TarInfo(name)
  info.type = kind
  info.linkname = target
  archive.addfile(info)


@pytest.mark.parametrize('add, reason', [
    (lambda a: _add_file(a, '../evil.txt'), r'"\.\."'),
    (lambda a: _add_file(a, 'ckpt/../../evil.txt'), r'"\.\."'),
    (lambda a: _add_file(a, '/tmp/evil.txt'), 'absolute path'),
    (lambda a: _add_link(a, 'ckpt/link', '/etc/passwd'), 'outside the target'),
    (lambda a: _add_link(a, 'ckpt/link', '../../outside'), 'outside the target'),
    (lambda a: _add_link(a, 'ckpt/hard', '../outside', tarfile.LNKTYPE), 'outside the target'),
    # Inside on its own, but chained with other links a ".." could lead out: refused.
    (lambda a: _add_link(a, 'ckpt/sub/up', '..'), r'through "\.\."'),
    (lambda a: _add_file(a, 'big.bin', b'x' * 2000), 'more than 1000 bytes'),
])
def test_unsafe_archives_are_refused(tmp_path, add, reason):
  archive = tmp_path / 'a.tar.gz'
  archive.write_bytes(_tar_bytes(lambda a: (_add_file(a, 'ckpt/ok.index'), add(a))))
  target = tmp_path / 'out' / 'extracted'
  with pytest.raises(download.UnsafeArchiveError, match=reason):
    download.safe_extract(archive, target, max_bytes=1000)
  # Nothing was written: not the target, not a half-extracted scratch folder.
  assert not target.exists() and os.listdir(tmp_path / 'out') == []
  assert not (tmp_path / 'evil.txt').exists()


def test_safe_archive_with_an_internal_link_extracts(tmp_path):
  archive = tmp_path / 'a.tar.gz'
  archive.write_bytes(_tar_bytes(lambda a: (_add_file(a, 'ckpt/data.bin', b'abc'),
                                            _add_link(a, 'ckpt/alias.bin', 'data.bin'))))
  target = download.safe_extract(archive, tmp_path / 'extracted')
  assert (target / 'ckpt' / 'alias.bin').read_bytes() == b'abc'


def _checkpoint_archive(tmp_path):
  """A .tar.gz of a small TensorFlow checkpoint in a folder, as the zoo publishes them."""
  source = tmp_path / 'source' / 'kmax_tiny_test'
  tf.train.Checkpoint(v=tf.Variable([1.0, 2.0, 3.0])).write(str(source / 'ckpt-150000'))
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w:gz') as archive:
    archive.add(source, arcname='kmax_tiny_test')
  return buffer.getvalue()


def _registry_with(tmp_path, url, sha256=''):
  path = tmp_path / 'registry.json'
  path.write_text(json.dumps({'checkpoints': [{
      'name': 'kmax_tiny_test', 'kind': 'kmax', 'dataset': 'coco_panoptic', 'backbone': 'R50',
      'config': 'configs/coco/kmax_deeplab/kmax_meta_r50_os32.textproto', 'url': url,
      'sha256': sha256}]}))
  return registry.load_registry(str(path))


def test_fetch_then_offline_cache_hit(server, tmp_path, cache):
  body = _checkpoint_archive(tmp_path)
  server.files['/kmax_tiny_test.tar.gz'] = body
  entries = _registry_with(tmp_path, server.url + '/kmax_tiny_test.tar.gz',
                           hashlib.sha256(body).hexdigest())
  prefix = download.fetch_checkpoint('kmax_tiny_test', entries, show_progress=False)
  assert prefix == str(cache / 'checkpoints' / 'kmax_tiny_test' / 'kmax_tiny_test' /
                       'ckpt-150000')
  np.testing.assert_array_equal(tf.train.load_checkpoint(prefix).get_tensor(
      'v/.ATTRIBUTES/VARIABLE_VALUE'), [1.0, 2.0, 3.0])
  assert (cache / 'archives' / 'kmax_tiny_test.tar.gz').read_bytes() == body
  # Offline: the host is gone, the cache answers.
  offline = _registry_with(tmp_path, _closed_port_url())
  requests = len(server.requests)
  assert download.fetch_checkpoint('kmax_tiny_test', offline, show_progress=False) == prefix
  assert len(server.requests) == requests


def test_unknown_zoo_name_suggests_close_names():
  with pytest.raises(registry.RegistryError, match='did you mean kmax_resnet50_coco_train'):
    registry.get_entry('kmax_resnet50_coco')


def test_initial_checkpoint_resolves_a_cached_zoo_name_offline(cache):
  from deeplab2_kmax.checkpoint import initial_checkpoint  # pylint: disable=g-import-not-at-top
  folder = cache / 'checkpoints' / 'kmax_resnet50_coco_train' / 'kmax_resnet50_coco_train'
  tf.train.Checkpoint(v=tf.Variable(1.0)).write(str(folder / 'ckpt-150000'))
  assert initial_checkpoint.resolve_checkpoint_path('kmax_resnet50_coco_train') == str(
      folder / 'ckpt-150000')
  # A name that is neither a zoo entry nor a file is refused at once, naming the config field
  # and a close zoo name.
  with pytest.raises(initial_checkpoint.InitialCheckpointError,
                     match=r'model_options.initial_checkpoint kmax_resnet50_coco_trai does not '
                     r'exist \(model-zoo names close to it: kmax_resnet50_coco_train'):
    initial_checkpoint.resolve_checkpoint_path('kmax_resnet50_coco_trai')
