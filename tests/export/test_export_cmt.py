"""A CMT-DeepLab model exports like kMaX (issue #10): the serving_default signature of a tiny
CMT model equals the in-framework model + post-processor (ids exactly, scores to 1e-5)."""

import pytest
import tensorflow as tf

from deeplab2_kmax import export
from tests.conftest import REPO_ROOT
from tests.export.conftest import TINY_OVERRIDE
from tests.export.conftest import assert_serving_equals_framework
from tests.export.conftest import sample_images
from tests.export.conftest import sharpen_max_head

CMT_DEMO_CONFIG = REPO_ROOT / 'configs' / 'synthetic' / 'cmt_r50_os32_synthetic_demo.textproto'


@pytest.fixture(scope='module')
def exported_cmt(tmp_path_factory):
  import keras  # pylint: disable=g-import-not-at-top
  from deeplab2_kmax.config import loader  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('export_cmt')
  assert 'kmax {' in TINY_OVERRIDE
  config = loader.load_config(str(CMT_DEMO_CONFIG), [TINY_OVERRIDE.replace('kmax {', 'cmt {')],
                              environ={'SYNTHETIC_DATA_DIR': str(root / 'data')})
  assert config.model_options.WhichOneof('meta_architecture') == 'cmt'
  keras.utils.set_random_seed(5)
  module = export.build_serving_module(config)
  sharpen_max_head(module.model)
  directory = export.export(module, str(root / 'serving'), input_types=['image_tensor'])
  return module, tf.saved_model.load(directory)


@pytest.mark.parametrize('shape', [(1, 65, 65), (2, 48, 80)])
def test_cmt_serving_default_equals_in_framework(exported_cmt, shape):
  module, loaded = exported_cmt
  assert module.model.name == 'cmt_deeplab'
  images = sample_images(sum(shape) + 1, shape)
  assert_serving_equals_framework(loaded, module, images, shape)
