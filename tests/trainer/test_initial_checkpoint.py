"""Partial restore of an initial checkpoint into a model with another class count."""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.checkpoint import initial_checkpoint
from deeplab2_kmax.checkpoint import layout as checkpoint_layout
from deeplab2_kmax.config import loader
from deeplab2_kmax.model import builder
from deeplab2_kmax.trainer import runner
from tests.trainer import conftest


def _values(layer):
  return {v.path: np.array(v.numpy()) for v in layer.weights}


def test_restores_all_but_class_dependent_layers_and_reports_them(synthetic_data_dir, tmp_path):
  source = builder.build_model(conftest.tiny_config(synthetic_data_dir))
  path = checkpoint_layout.make_checkpoint(source, [], tf.Variable(0, dtype=tf.int64)).write(
      str(tmp_path / 'source'))
  # Two more semantic channels: the semantic and transformer class heads change shape.
  # (Not validated: the config check would demand the dataset's 7.)
  target = builder.build_model(loader.load_config(
      conftest.SYNTHETIC_CONFIG, [conftest.TINY_OVERRIDE, 'model_options { kmax { '
                                  'auxiliary_semantic_head { output_channels: 9 } } }'],
      validate=False))
  lines = []
  table = initial_checkpoint.restore_initial_checkpoint(
      target, path, restore_semantic_last_layer=False, restore_instance_last_layer=False,
      log_fn=lines.append)
  # Every encoder variable now equals the source's (they were initialised differently).
  source_encoder = _values(source.encoder)
  target_encoder = _values(target.encoder)
  assert source_encoder.keys() == target_encoder.keys()
  assert any(not np.array_equal(a, b) for a, b in zip(
      source_encoder.values(), _values(builder.build_model(conftest.tiny_config(synthetic_data_dir)).encoder).values()))
  for key, value in source_encoder.items():
    np.testing.assert_array_equal(target_encoder[key], value, err_msg=key)
  skipped = table['skipped']
  assert any(p.startswith('semantic_head/final_conv.') and 'restore_semantic_last_layer' in why
             for p, why in skipped.items())
  assert any(p.startswith('predictor/transformer_class_head.') for p in skipped)
  assert not any(p.startswith('predictor/transformer_class_head.') for p in table['restored'])
  assert any(p.startswith('transformer_decoder/') for p in table['restored'])
  assert lines and lines[0].startswith('[init] ') and 'skipped' in lines[0]
  # A summary on the console (at most 5 rows of each kind), every row in the file it names.
  log = lines[0].splitlines()
  assert len(log) <= 1 + 3 * 6 + 1, log
  listing = log[-1].strip()
  assert listing.startswith('(every variable: ') and listing.endswith('.txt)'), log
  with open(listing[len('(every variable: '):-1], encoding='utf-8') as f:
    listed = f.read().splitlines()
  assert len(listed) >= 1 + len(table['restored']) + len(table['missing'])
  assert sum(line.startswith('restored') for line in listed) == len(table['restored'])

  # With the flags left true, the differing class heads are skipped for their shape.
  table = initial_checkpoint.restore_initial_checkpoint(target, path, log_fn=None)
  assert any('in the checkpoint' in why for why in table['skipped'].values())


def test_unreadable_checkpoint_names_the_field(tiny, tmp_path):
  model = builder.build_model(tiny())
  with pytest.raises(ValueError, match='^model_options.initial_checkpoint .* does not exist'):
    initial_checkpoint.restore_initial_checkpoint(model, str(tmp_path / 'nothing'))
  with pytest.raises(ValueError, match='^model_options.backbone.pretrained_weights .* does not '):
    initial_checkpoint.restore_initial_checkpoint(
        model, str(tmp_path / 'nothing'), field='model_options.backbone.pretrained_weights')
  (tmp_path / 'garbage.index').write_bytes(b'not a checkpoint index')
  with pytest.raises(ValueError, match='^model_options.initial_checkpoint ".*garbage" cannot be '
                     'read'):
    initial_checkpoint.restore_initial_checkpoint(model, str(tmp_path / 'garbage'))


def test_eval_of_a_checkpoint_from_another_config_says_which_and_what_to_do(tiny, tmp_path):
  # A checkpoint of a model with 2 cluster centers, evaluated with the 4-center config.
  other = tiny('model_options { kmax { num_cluster_centers: 2 } }')
  step = tf.Variable(3, dtype=tf.int64)
  checkpoint_layout.make_checkpoint(builder.build_model(other), [], step).write(
      str(tmp_path / 'ckpt-3'))
  (tmp_path / 'checkpoint').write_text('model_checkpoint_path: "ckpt-3"\n'
                                       'all_model_checkpoint_paths: "ckpt-3"\n')
  with pytest.raises(checkpoint_layout.CheckpointMismatchError,
                     match=r'ckpt-3 does not fit the configured model: \d+ model variables '
                     r'match, 0 are missing from it, [1-9]\d* have another shape.*new '
                     r'--model_dir') as info:
    runner.Experiment(tiny(), 'eval', str(tmp_path), log_fn=lambda _: None)
  # A summary: the differing variables (the 2 vs 4 cluster centers) by name and shape.
  lines = str(info.value).splitlines()
  assert ('  shape  transformer_decoder/cluster_centers: [1, 2, 16] in the checkpoint, '
          '[1, 4, 16] in the model') in lines[1:], lines
  assert len(lines) < 20, lines
