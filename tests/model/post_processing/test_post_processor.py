"""PostProcessor end to end: options, outputs and shapes, semantic_pred, undoing the
preprocessing of an eval batch, tf.function."""

import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format

from deeplab2_kmax import common
from deeplab2_kmax.data import datasets
from deeplab2_kmax.model.post_processing import post_processor
from deeplab2_kmax.protos import config_pb2
from deeplab2_kmax.protos import evaluator_pb2

# 0 = ignore, 1 = thing, 2 = stuff; class head channels (thing 1, stuff 2, void).
DESCRIPTOR = datasets.DatasetDescriptor(
    name='tiny', class_names=('void', 'thing', 'stuff'), class_has_instances=(False, True, False),
    colors=((0, 0, 0),) * 3, ignore_label=0, panoptic_label_divisor=256, category_ids=(0, 1, 2))


def _outputs():
  # 3x3 logits -> 5x5 crop. Slot 0: thing (0.9) at the top-left; slot 1: stuff (0.9) elsewhere;
  # slot 2: thing with low confidence (0.3) at the bottom-right corner.
  s0 = np.array([[8, 8, -8], [8, 8, -8], [-8, -8, -8]], np.float32)
  s1 = np.array([[-8, -8, 8], [-8, -8, 8], [8, 8, 0]], np.float32)
  s2 = np.array([[-8, -8, -8], [-8, -8, -8], [-8, -8, 8]], np.float32)
  mask_logits = np.stack([s0, s1, s2], -1)[None]
  class_logits = np.log(np.array([[[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.3, 0.2, 0.5]]]))
  return {common.PRED_PIXEL_SPACE_MASK_LOGITS: tf.constant(mask_logits),
          common.PRED_TRANSFORMER_CLASS_LOGITS: tf.constant(class_logits, tf.float32)}


@pytest.mark.parametrize('mode', ['pixelwise', 'maskwise'])
def test_outputs_at_the_crop(mode):
  options = text_format.Parse(f'transformer_post_processing: "{mode}"',
                              evaluator_pb2.EvaluatorOptions())
  processor = post_processor.PostProcessor.from_options(options, DESCRIPTOR, (5, 5))
  result = tf.function(processor)(_outputs())
  assert set(result) == {'panoptic_pred', 'semantic_pred', 'instance_pred', 'instance_scores',
                         'semantic_scores'}
  assert all(value.shape == (1, 5, 5) for value in result.values())
  panoptic_map = result['panoptic_pred'].numpy()[0]
  assert panoptic_map[0, 0] == 1 * 256 + 1        # Thing instance of slot 0.
  assert panoptic_map[0, 4] == 2 * 256            # Stuff.
  assert panoptic_map[4, 4] == 0                  # Slot 2 is below the 0.7 threshold: void.
  # semantic_pred ignores thresholds: the bottom-right corner is slot 2's thing class.
  assert result['semantic_pred'].numpy()[0, 4, 4] == 1
  assert result['semantic_pred'].numpy()[0, 0, 4] == 2
  np.testing.assert_allclose(result['semantic_scores'].numpy()[0, 0, 0], 0.9, rtol=1e-5)
  assert result['instance_pred'].numpy()[0, 0, 0] == 1
  assert result['instance_pred'].numpy()[0, 0, 4] == 2


def test_eval_batch_sizes_undo_padding_and_resize():
  experiment = text_format.Parse('''
      evaluator_options { transformer_post_processing: "maskwise" }
      eval_dataset_options { crop_size: [5, 5] }''', config_pb2.ExperimentOptions())
  processor = post_processor.build_post_processor(experiment, DESCRIPTOR)
  outputs = _outputs()
  at_crop = processor(outputs)
  # The image was resized to 3x3 and padded to 5x5; its raw size is 6x6.
  eval_batch = {common.RESIZED_SIZE: tf.constant([[3, 3]]),
                common.GT_SIZE_RAW: tf.constant([[6, 6]])}
  result = tf.function(processor)(outputs, eval_batch)
  assert all(value.shape == (1, 6, 6) for value in result.values())
  expected = tf.compat.v1.image.resize(at_crop['panoptic_pred'][0, :3, :3, None], [6, 6],
                                       method='nearest', align_corners=True)[..., 0]
  np.testing.assert_array_equal(result['panoptic_pred'].numpy()[0], expected.numpy())


def test_bad_options_are_named():
  with pytest.raises(ValueError, match='"pixelwise" or "maskwise", got "boxwise"'):
    post_processor.PostProcessor(DESCRIPTOR, (5, 5), mode='boxwise')
  processor = post_processor.PostProcessor(DESCRIPTOR, (5, 5))
  outputs = _outputs()
  outputs[common.PRED_TRANSFORMER_CLASS_LOGITS] = tf.zeros([1, 3, 5])
  with pytest.raises(ValueError, match='5 channels.*3 \\(void last\\)'):
    processor(outputs)


@pytest.mark.parametrize('mode', ['pixelwise', 'maskwise'])
def test_xla_compiled_post_processing_equals_graph_mode(mode):
  rng = np.random.default_rng(0)
  outputs = {common.PRED_PIXEL_SPACE_MASK_LOGITS: tf.constant(
                 rng.normal(size=(2, 5, 5, 6)) * 4, tf.float32),
             common.PRED_TRANSFORMER_CLASS_LOGITS: tf.constant(
                 rng.normal(size=(2, 6, 3)) * 3, tf.float32)}
  # Two images of different raw sizes, padded differently in the 17x17 crop.
  eval_batch = {common.RESIZED_SIZE: tf.constant([[9, 7], [17, 17]]),
                common.GT_SIZE_RAW: tf.constant([[20, 14], [30, 31]])}
  processor = post_processor.PostProcessor(
      DESCRIPTOR, (17, 17), mode=mode, class_threshold=0.3, thing_threshold=0.3,
      stuff_threshold=0.3, thing_area_limit=3, stuff_area_limit=5)
  compiled = tf.function(processor, jit_compile=True)
  # The raw-size path has data-dependent output shapes: XLA treats size_raw as a compile-time
  # constant, compiling once per distinct value.
  for batch in (None, eval_batch):
    expected = tf.function(processor)(outputs, batch)
    result = compiled(outputs, batch)
    for key, value in expected.items():
      if value.dtype.is_integer:
        np.testing.assert_array_equal(result[key].numpy(), value.numpy(), err_msg=key)
      else:
        np.testing.assert_allclose(result[key].numpy(), value.numpy(), atol=1e-5, err_msg=key)
    semantic = expected[common.PRED_SEMANTIC].numpy()
    panoptic_semantic = expected[common.PRED_PANOPTIC].numpy() // 256
    # Not a degenerate case: things, stuff and void all occur.
    assert {0, 1, 2} <= set(np.unique(panoptic_semantic).tolist()), np.unique(panoptic_semantic)
    assert set(np.unique(semantic).tolist()) <= {0, 1, 2}


def test_one_value_eval_crop_is_a_square():
  # Config validation allows crop_size: [5] (a 5x5 square); every reader agrees.
  experiment = text_format.Parse('eval_dataset_options { crop_size: [5] }',
                                 config_pb2.ExperimentOptions())
  processor = post_processor.build_post_processor(experiment, DESCRIPTOR)
  result = processor(_outputs())
  assert all(value.shape == (1, 5, 5) for value in result.values())
