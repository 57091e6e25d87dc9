"""Cached, resumable, verified downloads of model-zoo archives and their safe extraction.

    prefix = fetch_checkpoint('kmax_resnet50_coco_train')   # a checkpoint prefix in the cache

Cache layout (root: $DEEPLAB2_KMAX_CACHE, default ~/.cache/deeplab2_kmax):
  archives/<file>            the downloaded archive (only complete, verified files get here)
  archives/<file>.partial    an interrupted download; the next attempt resumes it (HTTP Range)
  archives/<file>.sha256     the digest recorded on first download when the registry has none
  checkpoints/<name>/        the extracted archive
A cached archive or extraction is used without touching the network, so a machine that
cannot reach the checkpoint host works from a cache filled elsewhere.
"""

import hashlib
import http.client
import os
import pathlib
import shutil
import socket
import tarfile
import tempfile
import urllib.error
import urllib.request
from typing import Optional

from absl import logging

from deeplab2_kmax import progress as progress_lib
from deeplab2_kmax.model_zoo import registry as registry_lib

CACHE_ENV = 'DEEPLAB2_KMAX_CACHE'
DEFAULT_CACHE = '~/.cache/deeplab2_kmax'
# Largest published archive is ConvNeXt-L kMaX (~2.4 GB); anything far beyond is not ours.
DEFAULT_MAX_EXTRACT_BYTES = 16 * 1024**3
_CHUNK_BYTES = 1 << 20


class DownloadError(RuntimeError):
  """A download failed; str(error) names the URL, the cause and what to do."""


class ChecksumMismatchError(DownloadError):
  """The downloaded bytes do not have the expected sha256 (the file was removed)."""


class UnsafeArchiveError(ValueError):
  """An archive member would be written outside the target folder, or it is too large."""


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE))


def sha256_of(path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK_BYTES), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _expected_digest(destination: pathlib.Path, sha256: str) -> tuple[str, bool]:
  """(digest to check against, whether it comes from the registry rather than a record)."""
  if sha256:
    return sha256.lower(), True
  record = destination.with_name(destination.name + '.sha256')
  if record.exists():
    return record.read_text().strip(), False
  return '', False


def _open(url: str, offset: int, timeout: float):
  request = urllib.request.Request(url, headers={'User-Agent': 'deeplab2_kmax-model-zoo'})
  if offset:
    request.add_header('Range', f'bytes={offset}-')
  return urllib.request.urlopen(request, timeout=timeout)  # pylint: disable=consider-using-with


def _transfer(url: str, partial: pathlib.Path, timeout: float, show_progress: bool) -> None:
  """Appends the rest of `url` to `partial`; raises on a cut connection (caller resumes)."""
  offset = partial.stat().st_size if partial.exists() else 0
  try:
    response = _open(url, offset, timeout)
  except urllib.error.HTTPError as error:
    if error.code == 416 and offset:
      return  # The partial file already holds every byte; the digest check decides.
    raise
  with response:
    if offset and response.status != 206:
      offset = 0  # The server ignored Range: start over.
    length = response.headers.get('Content-Length')
    total = offset + int(length) if length is not None else None
    mode = 'ab' if offset else 'wb'
    bar = progress_lib.Progress(total, label=partial.name[:-len('.partial')], unit='bytes') \
        if show_progress else None
    if bar:
      bar.done = offset
    with open(partial, mode) as f:
      while True:
        chunk = response.read(_CHUNK_BYTES)
        if not chunk:
          break
        f.write(chunk)
        if bar:
          bar.update(len(chunk))
    if bar:
      bar.close()
  if total is not None and partial.stat().st_size < total:
    raise http.client.IncompleteRead(b'', total - partial.stat().st_size)


def download(url: str, destination, sha256: str = '', timeout: float = 60.0,
             max_attempts: int = 5, show_progress: bool = True) -> pathlib.Path:
  """Downloads `url` to `destination` unless a verified copy is already there.

  The bytes go to `<destination>.partial` (resumed with an HTTP Range request after a cut
  connection, up to `max_attempts` connections), are checked against `sha256` (or against the
  digest recorded by an earlier download), and only then renamed to `destination`.

  Raises:
    DownloadError: no network, an HTTP error such as 404, or too many cut connections.
    ChecksumMismatchError: the digest differs; the partial file is removed.
  """
  destination = pathlib.Path(destination)
  expected, from_registry = _expected_digest(destination, sha256)
  if destination.exists():
    # Offline cache hit; a registry digest is checked every time, it is cheap next to a run.
    if from_registry and sha256_of(destination) != expected:
      destination.unlink()
      raise ChecksumMismatchError(
          f'the cached {destination} does not have the registry sha256 {expected}; it was '
          f'removed, download it again.')
    return destination
  destination.parent.mkdir(parents=True, exist_ok=True)
  partial = destination.with_name(destination.name + '.partial')
  for attempt in range(1, max_attempts + 1):
    try:
      _transfer(url, partial, timeout, show_progress)
      break
    except urllib.error.HTTPError as error:
      raise DownloadError(f'{url}: HTTP {error.code} {error.reason}; the address in '
                          f'model_zoo/registry.json may be outdated.') from None
    except urllib.error.URLError as error:
      raise DownloadError(
          f'{url}: cannot connect ({error.reason}); without network access place the file '
          f'at {destination} (the cache is {cache_dir()}, set ${CACHE_ENV} to move it).'
      ) from None
    except (http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as error:
      logging.warning('download of %s cut after %d bytes (%s); resuming (attempt %d of %d)',
                      url, partial.stat().st_size if partial.exists() else 0,
                      type(error).__name__, attempt, max_attempts)
      if attempt == max_attempts:
        raise DownloadError(f'{url}: the connection was cut {max_attempts} times; run again '
                            f'to resume from {partial}.') from None
  actual = sha256_of(partial)
  if expected and actual != expected:
    partial.unlink()
    source = 'model_zoo/registry.json' if from_registry else 'the digest recorded in the cache'
    raise ChecksumMismatchError(f'{url}: sha256 {actual} differs from {expected} in {source}; '
                                f'the download was removed.')
  if not expected:
    record = destination.with_name(destination.name + '.sha256')
    record.write_text(actual + '\n')
    logging.warning('%s has no sha256 in model_zoo/registry.json; recorded %s in %s (later '
                    'downloads are checked against it; add it to the registry).', url, actual,
                    record)
  os.replace(partial, destination)
  return destination


def _is_within(root: str, path: str) -> bool:
  return os.path.commonpath([root, path]) == root


def check_members(archive: tarfile.TarFile, target: str,
                  max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES) -> list:
  """The archive's members after refusing any that could write outside `target`.

  Refused: absolute names, `..` components, symbolic or hard links pointing outside or
  through `..`, devices and FIFOs, and archives whose files add up to more than `max_bytes`.
  """
  root = os.path.realpath(target)
  members, total = [], 0
  for member in archive.getmembers():
    name = member.name
    where = f'archive member "{name}"'
    if name.startswith(('/', '\\')) or os.path.isabs(name) or (len(name) > 1 and name[1] == ':'):
      raise UnsafeArchiveError(f'{where} has an absolute path; refusing to extract.')
    if '..' in pathlib.PurePosixPath(name.replace('\\', '/')).parts:
      raise UnsafeArchiveError(f'{where} contains ".."; refusing to extract.')
    destination = os.path.realpath(os.path.join(root, name))
    if not _is_within(root, destination):
      raise UnsafeArchiveError(f'{where} resolves outside {target}; refusing to extract.')
    if member.issym() or member.islnk():
      link = member.linkname
      base = os.path.dirname(destination) if member.issym() else root
      pointed = os.path.realpath(os.path.join(base, link))
      # A `..` in a link target is refused even when it stays inside: resolved through other
      # links of the archive (not on disk yet while checking) it could lead out.
      if (os.path.isabs(link) or '..' in pathlib.PurePosixPath(link).parts
          or not _is_within(root, pointed)):
        raise UnsafeArchiveError(f'{where} links to "{link}" outside the target folder (or '
                                 'through ".."); refusing to extract.')
    elif not (member.isfile() or member.isdir()):
      raise UnsafeArchiveError(f'{where} is a device or FIFO; refusing to extract.')
    total += member.size if member.isfile() else 0
    if total > max_bytes:
      raise UnsafeArchiveError(f'the archive unpacks to more than {max_bytes} bytes (at {where}); '
                               'refusing to extract.')
    members.append(member)
  return members


def safe_extract(archive_path, target, max_bytes: int = DEFAULT_MAX_EXTRACT_BYTES
                 ) -> pathlib.Path:
  """Extracts a tar archive into `target` (created atomically: all members or nothing)."""
  target = pathlib.Path(target)
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  scratch = tempfile.mkdtemp(prefix=target.name + '.', suffix='.extracting', dir=target.parent)
  try:
    with tarfile.open(archive_path) as archive:
      members = check_members(archive, scratch, max_bytes)
      kwargs = {'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}
      archive.extractall(scratch, members=members, **kwargs)
    os.replace(scratch, target)
  except (tarfile.TarError, OSError) as error:
    shutil.rmtree(scratch, ignore_errors=True)
    raise UnsafeArchiveError(f'{archive_path}: cannot extract ({error}).') from None
  except BaseException:
    shutil.rmtree(scratch, ignore_errors=True)
    raise
  return target


def find_checkpoint_prefix(folder) -> str:
  """The one TensorFlow checkpoint (`<prefix>.index`) under `folder`."""
  folder = pathlib.Path(folder)
  indexes = sorted(folder.rglob('*.index'))
  if len(indexes) == 1:
    return str(indexes[0])[:-len('.index')]
  for state in sorted(folder.rglob('checkpoint')):
    latest = _latest_in(state.parent)
    if latest:
      return latest
  raise DownloadError(f'{folder} holds {len(indexes)} checkpoints '
                      f'({[str(p) for p in indexes[:5]]}); expected exactly one.')


def _latest_in(folder) -> Optional[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.train.latest_checkpoint(str(folder))


def fetch_checkpoint(name: str, registry: Optional[dict] = None, show_progress: bool = True,
                     url: Optional[str] = None) -> str:
  """Downloads (if needed) and extracts zoo entry `name`; returns its checkpoint prefix."""
  entry = registry_lib.get_entry(name, registry)
  url = url or entry.url
  root = cache_dir()
  archive = root / 'archives' / url.rstrip('/').rsplit('/', 1)[-1]
  extracted = root / 'checkpoints' / entry.name
  if not extracted.exists():
    download(url, archive, entry.sha256, show_progress=show_progress)
    safe_extract(archive, extracted)
  return find_checkpoint_prefix(extracted)
