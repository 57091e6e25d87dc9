"""TF Serving warm-up requests of the SavedModel export (issue #17, deliverable 4).

The export command line writes `<version>/assets.extra/tf_serving_warmup_requests`. It is read
here the way TF Serving reads it: a TFRecord file of `PredictionLog` records (tensorflow-serving-
api's proto), each with a `predict_log.request`. Every request must name an exported signature,
pass TF Serving's input checks against that signature_def (names, dtypes, shapes) and run
through the signature, returning every declared output at the request's batch size.
"""

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import export
from deeplab2_kmax.export import serving_warmup
from tests.export.test_serving_request import _accepts
from tests.export.test_serving_request import _signature_def

prediction_log_pb2 = pytest.importorskip(
    'tensorflow_serving.apis.prediction_log_pb2',
    reason='tensorflow-serving-api is not installed (a main dependency: pip install -e ".")')


def _read_logs(directory):
  path = directory / export.ASSETS_EXTRA / serving_warmup.WARMUP_FILE
  assert path.is_file(), f'{path} was not written'
  logs = []
  for record in tf.data.TFRecordDataset(str(path)):
    log = prediction_log_pb2.PredictionLog()
    log.ParseFromString(record.numpy())
    logs.append(log)
  return logs


def _batch_size(request):
  (proto,) = request.inputs.values()
  return proto.tensor_shape.dim[0].size


def _run_request(loaded, signature_def, request):
  """Runs a PredictRequest through its signature; checks the outputs of signature_def."""
  signature = request.model_spec.signature_name
  assert set(request.inputs) == set(signature_def.inputs), signature
  for name, proto in request.inputs.items():
    assert _accepts(signature_def.inputs[name], proto), (signature, name)
  outputs = loaded.signatures[signature](
      **{name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()})
  assert set(outputs) == set(signature_def.outputs), signature
  batch = _batch_size(request)
  for name, tensor in outputs.items():
    assert tensor.shape[0] == batch, (signature, name, tensor.shape)
  return outputs


def test_warmup_requests_cover_every_signature_and_run(exported):
  logs = _read_logs(exported.directory)
  assert 0 < len(logs) <= serving_warmup.MAX_RECORDS
  assert all(log.WhichOneof('log_type') == 'predict_log' for log in logs)
  requests = [log.predict_log.request for log in logs]
  signatures = {request.model_spec.signature_name for request in requests}
  assert signatures == set(exported.loaded.signatures)
  crop_h, crop_w = exported.module.preprocess_options.crop_size
  sizes = {}
  for request in requests:
    signature = request.model_spec.signature_name
    outputs = _run_request(exported.loaded, _signature_def(exported, signature), request)
    # The dynamic-batch export warms up with one image per request.
    assert _batch_size(request) == 1
    sizes.setdefault(signature, set()).add(tuple(outputs[export.IMAGE_SIZE].numpy()[0]))
  # At the eval crop and at another aspect ratio, for every signature.
  for signature, shapes in sizes.items():
    assert (crop_h, crop_w) in shapes and len(shapes) == 2, (signature, shapes)


def test_warmup_requests_are_deterministic(exported):
  crop_size = exported.module.preprocess_options.crop_size
  first = serving_warmup.build_requests(list(export.INPUT_NAMES), crop_size)
  second = serving_warmup.build_requests(list(export.INPUT_NAMES), crop_size)
  assert [r.SerializeToString(deterministic=True) for r in first] == [
      r.SerializeToString(deterministic=True) for r in second]
  written = [log.predict_log.request for log in _read_logs(exported.directory)]
  assert {r.SerializeToString(deterministic=True) for r in written} == {
      r.SerializeToString(deterministic=True) for r in first}


def test_fixed_batch_size_export_warms_up_at_that_batch_size(exported, tmp_path):
  from deeplab2_kmax.export import saved_model  # pylint: disable=g-import-not-at-top
  module = export.ServingModule(exported.module.model, exported.module.post_processor,
                                exported.module.preprocess_options,
                                exported.module.post_processor._descriptor, batch_size=2)
  directory = saved_model.write(module, str(tmp_path), version=3,
                                input_types=['image_tensor', 'image_bytes'])
  logs = _read_logs(tmp_path / '3')
  requests = [log.predict_log.request for log in logs]
  assert {r.model_spec.signature_name for r in requests} == {'serving_default', 'image_bytes'}
  assert all(_batch_size(request) == 2 for request in requests)
  loaded = tf.saved_model.load(directory)
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  proto = saved_model_pb2.SavedModel()
  proto.ParseFromString((tmp_path / '3' / 'saved_model.pb').read_bytes())
  (meta_graph,) = proto.meta_graphs
  for request in requests[:1] + requests[-1:]:
    signature_def = meta_graph.signature_def[request.model_spec.signature_name]
    # The signature's fixed batch is declared, and the request matches it.
    assert signature_def.inputs[next(iter(request.inputs))].tensor_shape.dim[0].size == 2
    _run_request(loaded, signature_def, request)


def test_too_many_requests_are_refused(tmp_path):
  requests = serving_warmup.build_requests(['serving_default'], (4, 4))
  with pytest.raises(ValueError, match='at most 1000'):
    serving_warmup.write(str(tmp_path), requests * 501)


def test_gradient_images_are_deterministic_and_varied():
  images = serving_warmup.gradient_images(5, 7, batch_size=3)
  assert images.shape == (3, 5, 7, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, serving_warmup.gradient_images(5, 7, batch_size=3))
  assert len(np.unique(images[0].reshape(-1, 3), axis=0)) > 10
  assert not np.array_equal(images[0], images[1])


def test_warmup_images_of_large_crops_are_scaled_down():
  from deeplab2_kmax.export import serving_warmup  # pylint: disable=g-import-not-at-top
  # Cityscapes' 1025x2049 crop: aspect ratio kept, longest side 128.
  assert serving_warmup.image_shapes((1025, 2049)) == [(64, 128), (32, 128)]
  assert serving_warmup.image_shapes((65, 65)) == [(65, 65), (32, 65)]
  assert serving_warmup.image_shapes((1281, 1281)) == [(128, 128), (64, 128)]
