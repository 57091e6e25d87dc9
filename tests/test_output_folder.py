"""output_folder.problem: the folder a command writes into (train's --model_dir, export's
--output_path, predict's --output_dir), checked before anything is built. The command lines'
use of it is tested in tests/trainer/test_hostile_train.py and tests/export/test_hostile_serving.py."""

import os

import pytest

from deeplab2_kmax import output_folder


def test_hostile_a_file_or_a_path_below_a_file_is_named(tmp_path):
  a_file = tmp_path / 'file'
  a_file.write_text('')
  assert output_folder.problem('--model_dir', str(a_file), 'runs go there') == (
      f'--model_dir {a_file} is a file, not a folder; give a folder (runs go there).')
  assert output_folder.problem('--output_dir', str(a_file / 'a' / 'b'), 'x') == (
      f'--output_dir {a_file / "a" / "b"} cannot be created: {a_file} is a file; give a '
      'folder (x).')
  assert not (a_file.parent / 'a').exists()


def test_missing_folders_are_created_only_when_asked(tmp_path):
  assert output_folder.problem('--model_dir', str(tmp_path / 'absent'), 'x',
                               create=False) is None
  assert not (tmp_path / 'absent').exists()
  assert output_folder.problem('--model_dir', str(tmp_path / 'new' / 'deeper'), 'x') is None
  # Created, empty (the write probe is removed).
  assert (tmp_path / 'new' / 'deeper').is_dir()
  assert not os.listdir(tmp_path / 'new' / 'deeper')
  # An existing folder is fine, and is left as it was.
  (tmp_path / 'new' / 'deeper' / 'keep.txt').write_text('k')
  assert output_folder.problem('--model_dir', str(tmp_path / 'new' / 'deeper'), 'x') is None
  assert os.listdir(tmp_path / 'new' / 'deeper') == ['keep.txt']


def test_hostile_a_folder_that_cannot_be_written_is_named(tmp_path):
  if os.geteuid() == 0:
    pytest.skip('root writes into a read-only (0o555) folder: nothing to refuse')
  read_only = tmp_path / 'read_only'
  read_only.mkdir()
  read_only.chmod(0o555)
  try:
    assert output_folder.problem('--output_path', str(read_only), 'x') == (
        f'--output_path {read_only} is not writable (Permission denied); give a folder you can '
        'write to (x).')
    assert output_folder.problem('--output_path', str(read_only / 'sub'), 'x') == (
        f'--output_path {read_only / "sub"} cannot be created (Permission denied); give a '
        'folder (x).')
  finally:
    read_only.chmod(0o755)
