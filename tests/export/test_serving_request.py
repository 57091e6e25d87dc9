"""TF Serving request formats against the exported signatures (issue #7, point 4).

With tensorflow-serving-api (a dependency of the package) a gRPC PredictRequest is
built for each signature, checked against the SavedModel's signature_def as TF Serving checks it
(input names, dtypes, shapes), and its tensors are run through the signature; the response
carries every declared output. A REST body of the form documented in WORKSPACE.md is decoded
the way TF Serving's REST API decodes it (nested lists, {"b64": ...} for bytes) and run the same
way; test_workspace_snippets.py runs the documented bodies themselves.
"""

import base64
import json

import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax import export
from deeplab2_kmax.data.formats import tfrecord
from tests.export.conftest import sample_images


def _signature_def(exported, name):
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  saved_model = saved_model_pb2.SavedModel()
  saved_model.ParseFromString((exported.directory / 'saved_model.pb').read_bytes())
  (meta_graph,) = saved_model.meta_graphs
  assert list(meta_graph.meta_info_def.tags) == [export.TAG_SERVE]
  return meta_graph.signature_def[name]


def _inputs():
  images = sample_images(41, (2, 37, 52))
  encoded = [tf.io.encode_png(image).numpy() for image in images]
  examples = [tfrecord.encode_example(data, 'png', f'i{i}', 37, 52)
              for i, data in enumerate(encoded)]
  return {'serving_default': images, 'image_bytes': np.array(encoded, object),
          'tf_example': np.array(examples, object)}


def _accepts(tensor_info, tensor_proto):
  """TF Serving's checks: the dtype must equal, the shape be compatible."""
  if tensor_info.dtype != tensor_proto.dtype:
    return False
  declared = tf.TensorShape(tensor_info.tensor_shape)
  return declared.is_compatible_with(tf.TensorShape(tensor_proto.tensor_shape))


@pytest.mark.parametrize('signature', ['serving_default', 'image_bytes', 'tf_example'])
def test_predict_request_is_accepted_by_each_signature(exported, signature):
  predict_pb2 = pytest.importorskip(
      'tensorflow_serving.apis.predict_pb2',
      reason='tensorflow-serving-api is not installed (pip install -e .)')
  value = _inputs()[signature]
  request = predict_pb2.PredictRequest()
  request.model_spec.name = 'kmax'
  request.model_spec.signature_name = signature
  request.inputs[export.INPUT_NAMES[signature]].CopyFrom(tf.make_tensor_proto(value))
  request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # the wire
  signature_def = _signature_def(exported, request.model_spec.signature_name)
  assert set(request.inputs) == set(signature_def.inputs)
  for name, proto in request.inputs.items():
    assert _accepts(signature_def.inputs[name], proto), name
  outputs = exported.loaded.signatures[signature](
      **{name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()})
  response = predict_pb2.PredictResponse()
  for name, tensor in outputs.items():
    response.outputs[name].CopyFrom(tf.make_tensor_proto(tensor.numpy()))
  assert set(response.outputs) == set(signature_def.outputs)
  for name, proto in response.outputs.items():
    assert _accepts(signature_def.outputs[name], proto), name
  assert tf.make_ndarray(response.outputs['panoptic_pred']).shape == (2, 37, 52)
  # A wrong dtype is refused by the same check.
  wrong = tf.make_tensor_proto(np.zeros((1, 4, 4, 3), np.float32))
  assert not _accepts(_signature_def(exported, 'serving_default').inputs['images'], wrong)


def _decode_rest_inputs(body, signature_def):
  """TF Serving's REST "inputs" (columnar) format: lists, with {"b64": ...} for bytes."""
  (name, value), = json.loads(body)['inputs'].items()
  dtype = tf.dtypes.as_dtype(signature_def.inputs[name].dtype)
  if dtype == tf.string:
    return name, np.array([base64.b64decode(v['b64']) for v in value], object)
  return name, np.array(value, dtype.as_numpy_dtype)


@pytest.mark.parametrize('signature', ['serving_default', 'image_bytes'])
def test_documented_rest_body_runs(exported, signature):
  value = _inputs()[signature][:1]
  if signature == 'image_bytes':
    payload = [{'b64': base64.b64encode(v).decode('ascii')} for v in value]
  else:
    payload = value.tolist()
  body = json.dumps({'signature_name': signature,
                     'inputs': {export.INPUT_NAMES[signature]: payload}})
  signature_def = _signature_def(exported, json.loads(body)['signature_name'])
  name, decoded = _decode_rest_inputs(body, signature_def)
  outputs = exported.loaded.signatures[signature](**{name: tf.constant(decoded)})
  assert outputs['panoptic_pred'].shape == (1, 37, 52)
