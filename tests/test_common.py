"""Pins the string keys other tools and DeepLab2 data depend on: a rename must be deliberate."""

from deeplab2_kmax import common


def test_tfrecord_keys_equal_deeplab2():
  assert (common.KEY_ENCODED_IMAGE, common.KEY_IMAGE_FILENAME, common.KEY_IMAGE_FORMAT,
          common.KEY_IMAGE_HEIGHT, common.KEY_IMAGE_WIDTH, common.KEY_IMAGE_CHANNELS,
          common.KEY_ENCODED_LABEL, common.KEY_LABEL_FORMAT) == (
              'image/encoded', 'image/filename', 'image/format', 'image/height', 'image/width',
              'image/channels', 'image/segmentation/class/encoded',
              'image/segmentation/class/format')


def test_sample_and_prediction_keys():
  assert (common.GT_SEMANTIC, common.GT_PANOPTIC, common.GT_THING_ID_MASK,
          common.GT_THING_ID_CLASS, common.GT_IS_CROWD, common.SEMANTIC_LOSS_WEIGHT) == (
              'semantic_gt', 'panoptic_gt', 'thing_id_mask_gt', 'thing_id_class_gt',
              'is_crowd_gt', 'semantic_loss_weight')
  assert (common.PRED_SEMANTIC_LOGITS, common.PRED_PIXEL_SPACE_NORMALIZED_FEATURE,
          common.PRED_PIXEL_SPACE_MASK_LOGITS, common.PRED_TRANSFORMER_CLASS_LOGITS,
          common.PRED_AUXILIARY_OUTPUTS) == (
              'semantic_logits', 'pixel_space_normalized_feature', 'pixel_space_mask_logits',
              'transformer_class_logits', 'auxiliary_outputs_pred')

  # The exported signatures' outputs (TF Serving clients read them by name).
  assert (common.PRED_PANOPTIC, common.PRED_SEMANTIC, common.PRED_INSTANCE,
          common.PRED_INSTANCE_SCORES, common.PRED_SEMANTIC_SCORES, common.PRED_IMAGE_SIZE,
          common.PRED_NUM_SEGMENTS, common.PRED_SEGMENT_IDS, common.PRED_SEGMENT_CLASSES,
          common.PRED_SEGMENT_SCORES, common.PRED_SEGMENT_AREAS) == (
              'panoptic_pred', 'semantic_pred', 'instance_pred', 'instance_scores',
              'semantic_scores', 'image_size', 'num_segments', 'segment_ids',
              'segment_classes', 'segment_scores', 'segment_areas')


def test_keys_are_unique():
  values = [v for k, v in vars(common).items() if k.isupper() and isinstance(v, str)]
  duplicates = {v for v in values if values.count(v) > 1}
  assert not duplicates


def test_decoder_stage_endpoints_by_stride():
  # DeepLab2's names: the pixel decoder writes them, the transformer decoders read them.
  assert [common.decoder_stage_endpoint(stride) for stride in (32, 16, 8, 4, 2)] == [
      'decoder_stage1', 'decoder_stage2', 'decoder_stage3', 'decoder_stage4', 'decoder_stage5']
  for stride in (0, 12, 64):
    try:
      common.decoder_stage_endpoint(stride)
    except ValueError as error:
      assert str(stride) in str(error)
    else:
      raise AssertionError(f'stride {stride} was accepted')
