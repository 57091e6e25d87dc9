"""Name mapping between DeepLab2 kMaX checkpoint keys and our variable paths.

DeepLab2 checkpoints are object-graph checkpoints of `tf.train.Checkpoint(**checkpoint_items)`;
keys look like `encoder/_stage4/_block6/_conv3_bn/_batch_norm/gamma/.ATTRIBUTES/VARIABLE_VALUE`
(private attribute names, list elements as `/<index>`). Our sub-layers carry DeepLab2's names,
so a key maps to a Keras variable path (relative to the model, i.e. without the model's own
name) by a few rules:

1. drop `/.ATTRIBUTES/VARIABLE_VALUE` and the leading underscore of every component;
2. list elements `name/<i>` become `name_<i>`; the transformer decoder's per-layer wrapper
   (`kmax_decoder/<i>/block1_transformer`) becomes `kmax_decoder_<i>`;
3. the MaX head's items live under `predictor/`, the semantic head's two items are
   `semantic_head/conv_block` and `semantic_head/final_conv`;
4. Keras 3 names the depthwise kernel `kernel` (DeepLab2: `depthwise_kernel`);
5. ConvNeXt encoders (Keras-2 Sequentials upstream, whose elements are keyed
   `layer_with_weights-<j>`): `downsample_layers/0` is our `stem` (conv, then norm),
   `downsample_layers/<i>` our `downsampling_block_<i-1>` (norm, then conv), and
   `stages/<i>/layer_with_weights-<j>` our `convnext_block_<i>_<j>`.

Every variable keeps DeepLab2's shape (Conv1D kernels [1, in, out], axial qkv kernels
[in, 2 key + value], RPE tables [509, depth], multi-axis BN statistics with broadcast shapes),
so a converter copies values without reshaping, with one exception: ConvNeXt's depthwise
kernels are grouped Conv2D kernels [7, 7, 1, C] upstream and DepthwiseConv2D kernels
[7, 7, C, 1] here; `to_our_layout` reshapes them (the singleton axis moves, element order is
unchanged).

`ours_to_upstream` inverts the rules (the inverse needs to know whether the encoder is a
ConvNeXt, whose stem path `encoder/stem/conv` would otherwise read as ResNet's `_stem/_conv`),
and `to_deeplab2_layout` inverts `to_our_layout`.
"""

import re

import numpy as np


CHECKPOINT_SUFFIX = '/.ATTRIBUTES/VARIABLE_VALUE'

# DeepLab2 checkpoint item -> our path prefix.
_ITEM_PREFIXES = {
    'pixel_space_head': 'predictor/pixel_space_head',
    'transformer_mask_head': 'predictor/transformer_mask_head',
    'transformer_class_head': 'predictor/transformer_class_head',
    'pixel_space_feature_batch_norm': 'predictor/pixel_space_feature_batch_norm',
    'pixel_space_mask_batch_norm': 'predictor/pixel_space_mask_batch_norm',
    'semantic_head_without_last_layer': 'semantic_head/conv_block',
    'semantic_last_layer': 'semantic_head/final_conv',
}
_VARIABLE_RENAMES = {'depthwise_kernel': 'kernel'}


_CONVNEXT_STEM = re.compile(r'^encoder/downsample_layers/0/layer_with_weights-(\d)/(.*)$')
_CONVNEXT_DOWNSAMPLE = re.compile(
    r'^encoder/downsample_layers/(\d)/layer_with_weights-(\d)/(.*)$')
_CONVNEXT_BLOCK = re.compile(r'^encoder/stages/(\d+)/layer_with_weights-(\d+)/(.*)$')


def _convnext_path(key):
  """Our path of a DeepLab2 ConvNeXt encoder key, or None for other keys."""
  match = _CONVNEXT_STEM.match(key)
  if match:
    return f'encoder/stem/{("conv", "norm")[int(match.group(1))]}/{match.group(2)}'
  match = _CONVNEXT_DOWNSAMPLE.match(key)
  if match:
    part = ('norm', 'conv')[int(match.group(2))]
    return f'encoder/downsampling_block_{int(match.group(1)) - 1}/{part}/{match.group(3)}'
  match = _CONVNEXT_BLOCK.match(key)
  if match:
    return f'encoder/convnext_block_{match.group(1)}_{match.group(2)}/{match.group(3)}'
  return None


# Sub-layers DeepLab2 keeps in Python lists (checkpoint keys `_<name>/<index>`).
_LIST_ATTRIBUTES = ('backbone_norms', 'kmax_decoder', 'skip_connections', 'stages')
_LIST_ELEMENT = re.compile(r'^(' + '|'.join(_LIST_ATTRIBUTES) + r')_(\d+)$')
# Path components DeepLab2 tracks under a public attribute name (no leading underscore).
_PUBLIC_COMPONENTS = ('conv_block', 'final_conv')
_OUR_CONVNEXT_STEM = re.compile(r'^encoder/stem/(conv|norm)/(.*)$')
_OUR_CONVNEXT_DOWNSAMPLE = re.compile(r'^encoder/downsampling_block_(\d)/(norm|conv)/(.*)$')
_OUR_CONVNEXT_BLOCK = re.compile(r'^encoder/convnext_block_(\d+)_(\d+)/(.*)$')


def _upstream_convnext_key(path):
  """DeepLab2 key (without suffix) of our ConvNeXt encoder path, or None for other paths."""
  match = _OUR_CONVNEXT_STEM.match(path)
  if match:
    index = ('conv', 'norm').index(match.group(1))
    return f'encoder/downsample_layers/0/layer_with_weights-{index}/{match.group(2)}'
  match = _OUR_CONVNEXT_DOWNSAMPLE.match(path)
  if match:
    index = ('norm', 'conv').index(match.group(2))
    return (f'encoder/downsample_layers/{int(match.group(1)) + 1}/'
            f'layer_with_weights-{index}/{match.group(3)}')
  match = _OUR_CONVNEXT_BLOCK.match(path)
  if match:
    return f'encoder/stages/{match.group(1)}/layer_with_weights-{match.group(2)}/{match.group(3)}'
  return None


def ours_to_upstream(path, convnext_encoder=False):
  """Our variable path relative to the model -> DeepLab2 checkpoint key.

  The inverse of upstream_to_ours: components regain their underscore, list elements
  `kmax_decoder_3` become `_kmax_decoder/3/_block1_transformer`, predictor paths their item
  names, and the key its `/.ATTRIBUTES/VARIABLE_VALUE` suffix.
  """
  if convnext_encoder:
    key = _upstream_convnext_key(path)
    if key is not None:
      return key + CHECKPOINT_SUFFIX
  for item, prefix in _ITEM_PREFIXES.items():
    if path.startswith(prefix + '/'):
      path = item + path[len(prefix):]
      break
  parts = path.split('/')
  key = [parts[0]]
  for part in parts[1:-1]:
    match = _LIST_ELEMENT.match(part)
    if match:
      key += [f'_{match.group(1)}', match.group(2)]
      if match.group(1) == 'kmax_decoder':
        key.append('_block1_transformer')
    elif part in _PUBLIC_COMPONENTS:
      key.append(part)
    else:
      key.append(f'_{part}')
  variable = parts[-1]
  if variable == 'kernel' and parts[-2] == 'depthwise_conv':
    variable = 'depthwise_kernel'
  return '/'.join(key + [variable]) + CHECKPOINT_SUFFIX


def to_deeplab2_layout(path, value, convnext_encoder=False):
  """Our value of variable `path` in DeepLab2's layout (inverse of to_our_layout)."""
  value = np.asarray(value)
  if (convnext_encoder and _OUR_CONVNEXT_BLOCK.match(path)
      and path.endswith('/depthwise_conv/kernel')):
    height, width, channels, _ = value.shape
    return value.reshape(height, width, 1, channels)
  return value


def layouts_compatible(upstream_shape, shape):
  """Whether a DeepLab2 value of `upstream_shape` fills our `shape` (equal up to unit axes)."""
  squeeze = lambda dims: tuple(int(d) for d in dims if int(d) != 1)
  return squeeze(upstream_shape) == squeeze(shape) and (
      int(np.prod(upstream_shape)) == int(np.prod(shape)))


def to_our_layout(value, shape):
  """Converts a DeepLab2 value to our variable's shape (same elements, same order)."""
  value = np.asarray(value)
  if tuple(value.shape) == tuple(shape):
    return value
  if not layouts_compatible(value.shape, shape):
    raise ValueError(f'cannot convert a {value.shape} value to {tuple(shape)}')
  return value.reshape(shape)


def upstream_to_ours(key):
  """DeepLab2 checkpoint key -> our variable path relative to the model; None if not a variable.

  >>> upstream_to_ours('transformer_decoder/_kmax_decoder/3/_block1_transformer/'
  ...                  '_memory_attention/_batch_norm_similarity/gamma/.ATTRIBUTES/VARIABLE_VALUE')
  'transformer_decoder/kmax_decoder_3/memory_attention/batch_norm_similarity/gamma'
  """
  if not key.endswith(CHECKPOINT_SUFFIX):
    return None
  convnext = _convnext_path(key[:-len(CHECKPOINT_SUFFIX)])
  if convnext is not None:
    return convnext
  parts = [p.lstrip('_') for p in key[:-len(CHECKPOINT_SUFFIX)].split('/')]
  merged = []
  for part in parts:
    if part.isdigit() and merged:
      merged[-1] = f'{merged[-1]}_{part}'
    elif part == 'block1_transformer' and merged and merged[-1].startswith('kmax_decoder_'):
      continue
    else:
      merged.append(part)
  merged[-1] = _VARIABLE_RENAMES.get(merged[-1], merged[-1])
  if merged[0] in _ITEM_PREFIXES:
    merged = _ITEM_PREFIXES[merged[0]].split('/') + merged[1:]
  return '/'.join(merged)


def model_variable_paths(model):
  """{path relative to the model: variable} for every variable of a built model."""
  prefix = model.name + '/'
  paths = {}
  for variable in model.weights:
    path = variable.path
    paths[path[len(prefix):] if path.startswith(prefix) else path] = variable
  return paths


def build_mapping(upstream_keys, model):
  """Maps DeepLab2 checkpoint keys onto the model's variables.

  Args:
    upstream_keys: Iterable of checkpoint keys (non-variable keys are ignored).
    model: A built KMaXDeepLab.

  Returns:
    (mapping {upstream key: our path}, unmatched upstream keys, our paths left unmapped).
  """
  ours = model_variable_paths(model)
  mapping, unmatched = {}, []
  for key in upstream_keys:
    path = upstream_to_ours(key)
    if path is None:
      continue
    if path in ours:
      mapping[key] = path
    else:
      unmatched.append(key)
  used = set(mapping.values())
  unmapped = sorted(set(ours) - used)
  return mapping, unmatched, unmapped


