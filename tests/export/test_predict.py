"""deeplab2_kmax.predict on the session's exported tiny model (issue #7, point 6)."""

import json

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import common
from deeplab2_kmax import export
from deeplab2_kmax import predict
from deeplab2_kmax.data.formats import coco_panoptic as coco_format
from deeplab2_kmax.data.formats import png_encoding
from tests.export.conftest import sample_images


@pytest.fixture(scope='module')
def image_files(tmp_path_factory):
  folder = tmp_path_factory.mktemp('images')
  shapes = {'a.png': (48, 70), 'b.jpg': (65, 65), 'c.png': (30, 90)}
  for index, (name, shape) in enumerate(shapes.items()):
    image = sample_images(30 + index, shape)
    encode = tf.io.encode_png if name.endswith('.png') else tf.io.encode_jpeg
    (folder / name).write_bytes(encode(image).numpy())
  return folder, shapes


def test_predict_files_from_saved_model(exported, image_files, tmp_path):
  folder, shapes = image_files
  predictor = predict.Predictor.from_saved_model(str(exported.base))  # base path: newest version
  assert predictor.source == str(exported.directory)
  assert predictor.descriptor == exported.module.descriptor
  files = predict.resolve_inputs(str(folder / '*'))
  annotations = predict.predict_files(predictor, files, str(tmp_path), show_progress=False)
  assert [a['file_name'] for a in annotations] == ['a.png', 'b.png', 'c.png']
  descriptor = exported.module.descriptor
  for name, shape in shapes.items():
    stem = name.split('.')[0]
    data = (folder / name).read_bytes()
    want = exported.loaded.signatures['image_bytes'](image_bytes=tf.constant([data]))
    want_panoptic = want[common.PRED_PANOPTIC].numpy()[0]
    # The panoptic PNG decodes to COCO ids; segments_info maps each id to its panoptic label.
    ids = coco_format.read_panoptic_png(str(tmp_path / 'panoptic' / f'{stem}.png'))
    assert ids.shape == shape
    info = json.loads((tmp_path / 'segments' / f'{stem}.json').read_text())
    decoded = np.zeros(shape, np.int64)  # void: class 0, instance 0
    for segment in info['segments_info']:
      mask = ids == segment['id']
      assert mask.sum() == segment['area'] > 0
      decoded[mask] = segment['panoptic_label']
      class_id = segment['panoptic_label'] // descriptor.panoptic_label_divisor
      assert segment['category_id'] == descriptor.category_ids[class_id]
      assert segment['category_name'] == descriptor.class_names[class_id]
      scores = want[common.PRED_INSTANCE_SCORES].numpy()[0][want_panoptic ==
                                                            segment['panoptic_label']]
      assert segment['score'] == pytest.approx(scores.mean(), abs=1e-5)
    np.testing.assert_array_equal(decoded, want_panoptic)
    assert len(info['segments_info']) >= 1
    overlay = png_encoding.read_png(str(tmp_path / 'overlay' / f'{stem}.png'))
    assert overlay.shape[0] >= predict.MIN_OVERLAY_HEIGHT and overlay.shape[1] > shape[1]
  document = json.loads((tmp_path / predict.PANOPTIC_JSON).read_text())
  assert len(document['annotations']) == 3
  assert [c['name'] for c in document['categories']] == list(descriptor.class_names[1:])


def test_checkpoint_predictor_equals_saved_model(exported, image_files):
  folder, _ = image_files
  data = (folder / 'a.png').read_bytes()
  from_checkpoint = predict.Predictor.from_checkpoint(exported.config,
                                                      str(exported.checkpoint_dir))
  from_saved_model = predict.Predictor.from_saved_model(str(exported.directory))
  got, want = from_checkpoint(data), from_saved_model(data)
  assert got.keys() == want.keys()
  for key in export.PREDICTION_KEYS + export.SEGMENT_KEYS:
    np.testing.assert_allclose(got[key], want[key], atol=1e-5, rtol=0, err_msg=key)


def test_overlay_legend_names_the_classes_present(exported):
  descriptor = exported.module.descriptor
  divisor = descriptor.panoptic_label_divisor
  panoptic = np.zeros((20, 30), np.int64)
  panoptic[:, :10] = 2 * divisor + 1   # a square instance
  panoptic[:, 10:] = 4 * divisor       # grass
  image = np.full((20, 30, 3), 128, np.uint8)
  overlay = predict.overlay_with_legend(image, panoptic, descriptor)
  scale = -(-predict.MIN_OVERLAY_HEIGHT // 20)
  assert overlay.shape[0] == 20 * scale and overlay.shape[1] > 30 * scale
  legend = overlay[:, 30 * scale:]
  # One swatch per class present, in its colour; no swatch of an absent class.
  for class_id in range(1, descriptor.num_classes):
    present = np.all(legend == descriptor.colors[class_id], axis=-1).sum() > 50
    assert present == (class_id in (2, 4)), descriptor.class_names[class_id]


def test_resolve_inputs_names_the_pattern_when_nothing_matches(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing|matches no image'):
    predict.resolve_inputs(str(tmp_path / '*.png'))
