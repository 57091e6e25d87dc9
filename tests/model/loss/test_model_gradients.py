"""Gradients of the full training loss reach every trainable variable of a tiny kMaX model."""

import numpy as np
import tensorflow as tf
from google.protobuf import text_format

from deeplab2_kmax import common
from deeplab2_kmax.model import builder
from deeplab2_kmax.model.loss import builder as loss_builder
from tests.model import overfit

_LOSS_OPTIONS = '''
pq_style_loss { weight: 3.0 }
mask_id_cross_entropy_loss { weight: 0.3 }
instance_discrimination_loss { weight: 1.0 }
semantic_loss { weight: 1.0 }
'''
# Offsets that are zero-gradient by construction (so their gradient is rounding noise): a
# constant added before a softmax over the axis it is constant on, or before a training-mode BN
# (which subtracts the batch mean), changes nothing downstream. Same in DeepLab2.
_INVARIANT_OFFSETS = (
    # Same constant on every slot's mask logit: softmax over slots (and argmax) unchanged.
    'pixel_space_mask_batch_norm/beta',
    # Per-head constant on attention logits: softmax over keys unchanged.
    'batch_norm_similarity/beta',
    # Followed by a 1x1 conv and a training-mode BN (kmeans_memory_conv3_bn).
    'kmeans_memory_batch_norm_retrieved_value/beta',
    # Feeds the width-axis attention, whose query/key/value come from a conv + training BN.
    'height_axis/batch_norm_retrieved_output/beta',
)


def _experiment(tiny_options):
  options = type(tiny_options)()
  options.CopyFrom(tiny_options)
  # Drop path would zero whole branches of a batch at random.
  options.model_options.kmax.transformer_decoder_drop_path_keep_prob = 1.0
  options.model_options.kmax.instance_discrimination_sample_k = 32
  options.train_dataset_options.max_thing_id = 8
  text_format.Parse(_LOSS_OPTIONS, options.trainer_options.loss_options)
  return options


def _gradients(model, loss, batch):
  with tf.GradientTape() as tape:
    outputs = model(batch[common.IMAGE], training=True)
    losses = loss(batch, outputs, seed=tf.constant([1, 2]))
    total = tf.reduce_sum(losses[common.TOTAL_LOSS])
  return {v.path: g for v, g in zip(model.trainable_variables,
                                    tape.gradient(total, model.trainable_variables))}


def test_every_trainable_variable_gets_a_gradient(tiny_options):
  options = _experiment(tiny_options)
  descriptor = builder.dataset_descriptor(options)
  model = builder.build_model(options, crop_size=(33, 33))
  loss = loss_builder.build_loss(options, descriptor)
  assert loss.loss_terms.count(common.INSTANCE_DISCRIMINATION_LOSS) == 1
  # Two images: a BN over a globally pooled [1, 1, 1, C] map of a single image normalises it to
  # zero, which would cut the gradient of the ASPP pooling branch.
  batch, _ = overfit.synthetic_batch(descriptor, (33, 33), 8, scene_seeds=[0, 1])

  gradients = _gradients(model, loss, batch)
  assert [path for path, g in gradients.items() if g is None] == []
  assert np.isfinite(sum(float(tf.reduce_sum(g)) for g in gradients.values()))

  # DeepLab2 zero-initialises the last BN scale of every residual branch, so at initialisation
  # the branch below it gets a zero gradient while the scale itself gets a non-zero one. Once
  # the scales are non-zero (after the first update), the whole network is reached.
  zero_scales = [v for v in model.trainable_variables
                 if v.path.endswith('gamma') and not np.any(v.numpy())]
  assert len(zero_scales) >= 10
  for variable in zero_scales:
    assert np.any(gradients[variable.path].numpy()), variable.path
    variable.assign(tf.fill(variable.shape, 0.5))

  gradients = _gradients(model, loss, batch)
  magnitude = {path: float(tf.reduce_max(tf.abs(g))) for path, g in gradients.items()}
  largest = max(magnitude.values())
  invariant = [path for path in magnitude if path.endswith(_INVARIANT_OFFSETS)]
  # 4 mask-logit BNs (predictor + 3 decoder layers), 3 + 4 attention-logit BNs (3 decoder
  # layers, 2 axial blocks x 2 axes), 3 k-means retrieved values, 2 height-axis outputs.
  assert len(invariant) == 16
  for path in invariant:
    assert magnitude[path] <= 1e-6 * largest, (path, magnitude[path], largest)
  assert [path for path, value in magnitude.items()
          if value == 0.0 and path not in invariant] == []
