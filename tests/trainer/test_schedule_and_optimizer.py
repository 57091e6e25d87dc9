"""Learning-rate schedule values and the optimizer groups' weight decay, against hand-computed
numbers."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from deeplab2_kmax.protos import trainer_pb2
from deeplab2_kmax.trainer import optimizer as optimizer_lib
from deeplab2_kmax.trainer import schedule as schedule_lib


def test_poly_with_warmup_is_evaluated_on_the_global_step():
  s = schedule_lib.LearningRateSchedule(0.1, total_steps=100, warmup_steps=10, poly_power=0.9)
  # Warm-up: base * step / warmup.
  assert float(s(0)) == pytest.approx(0.0)
  assert float(s(5)) == pytest.approx(0.05)
  # After warm-up the decay uses the unshifted step: (1 - 10/100)^0.9, not (1 - 0/90)^0.9.
  assert float(s(10)) == pytest.approx(0.1 * 0.9 ** 0.9, rel=1e-6)
  assert float(s(55)) == pytest.approx(0.1 * 0.45 ** 0.9, rel=1e-6)
  assert float(s(100)) == pytest.approx(0.0, abs=1e-9)
  assert float(s(150)) == pytest.approx(0.0, abs=1e-9)


def test_cosine_decay_end_fraction():
  s = schedule_lib.LearningRateSchedule(0.2, total_steps=40, policy='cosine',
                                        cosine_end_fraction=0.1)
  assert float(s(0)) == pytest.approx(0.2)
  assert float(s(20)) == pytest.approx(0.02 + 0.18 * 0.5 * (1 + math.cos(math.pi / 2)))
  assert float(s(40)) == pytest.approx(0.02)


def test_unknown_policy_is_named():
  with pytest.raises(ValueError, match='learning_policy.*"step"'):
    schedule_lib.LearningRateSchedule(0.1, 10, policy='step')


class _Toy(keras.Model):
  """An 'encoder' and a head holding every kind of variable the decay rule distinguishes."""

  def __init__(self):
    super().__init__()
    self.encoder = keras.layers.Dense(3, name='encoder_dense')
    self.norm = keras.layers.BatchNormalization(name='norm')
    self.head = keras.layers.Dense(2, name='head')

  def build(self, input_shape):
    self.encoder.build(input_shape)
    self.norm.build((None, 3))
    self.head.build((None, 3))
    self.cluster_centers = self.add_weight(shape=(4, 3), name='cluster_centers',
                                           initializer='ones')
    self.layer_scale = self.add_weight(shape=(3,), name='layer_scale', initializer='ones')

  def call(self, x):
    return self.head(self.norm(self.encoder(x))) + tf.reduce_sum(self.cluster_centers)

  def backbone_trainable_variables(self):
    return list(self.encoder.trainable_variables)


def _solver(**kwargs):
  options = dict(optimizer='adamw', base_learning_rate=0.1, training_number_of_steps=1000,
                 learning_policy='poly', poly_learning_power=1.0)
  options.update(kwargs)
  return trainer_pb2.SolverOptions(**options)


def test_adamw_decays_kernels_only_and_scales_the_backbone():
  model = _Toy()
  model.build((None, 5))
  step = tf.Variable(0, dtype=tf.int64)
  groups = optimizer_lib.build_optimizers(
      _solver(adamw_weight_decay=0.5, backbone_learning_rate_multiplier=0.1), model, step)
  assert [g.name for g in groups] == ['backbone', 'main']
  assert {id(v) for v in groups[0].variables} == {id(v) for v in
                                                  model.encoder.trainable_variables}
  assert float(groups[0].learning_rate()) == pytest.approx(0.01)
  assert float(groups[1].learning_rate()) == pytest.approx(0.1)
  before = {v.path: np.array(v.numpy()) for v in model.trainable_variables}
  for group in groups:
    # Zero gradients: Adam's update is 0, so any change is the decoupled decay lr * wd * w.
    group.optimizer.apply([tf.zeros_like(v) for v in group.variables], group.variables)
  for group in groups:
    lr = 0.01 if group.name == 'backbone' else 0.1
    for v in group.variables:
      old = before[v.path]
      if v.name == 'kernel':
        np.testing.assert_allclose(v.numpy(), old * (1 - lr * 0.5), rtol=1e-5, err_msg=v.path)
      else:
        np.testing.assert_allclose(v.numpy(), old, err_msg=v.path)
  decayed = sorted(v.path.split('/', 1)[1] for v in model.trainable_variables
                   if optimizer_lib.is_decayed(v))
  assert decayed == ['encoder_dense/kernel', 'head/kernel']


def test_rate_follows_the_shared_step_and_single_group_without_multiplier():
  model = _Toy()
  model.build((None, 5))
  step = tf.Variable(0, dtype=tf.int64)
  (group,) = optimizer_lib.build_optimizers(_solver(), model, step)
  step.assign(250)
  assert float(group.learning_rate()) == pytest.approx(0.075)


def test_clipping_bounds_the_global_norm():
  grads = [tf.constant([3.0, 4.0]), tf.constant([12.0])]
  clipped, norm = optimizer_lib.clip_gradients(
      _solver(use_gradient_clipping=True, clip_gradient_norm=1.3), grads)
  assert float(norm) == pytest.approx(13.0)
  np.testing.assert_allclose(clipped[0].numpy(), [0.3, 0.4], rtol=1e-5)
  unclipped, _ = optimizer_lib.clip_gradients(_solver(), grads)
  np.testing.assert_allclose(unclipped[1].numpy(), [12.0])


def test_unknown_optimizer_is_named():
  with pytest.raises(ValueError, match='"lamb"'):
    optimizer_lib.make_optimizer(_solver(optimizer='lamb'), lambda: 0.1, [])


def _run_updates(make_optimizer, strategy, steps=3):
  """Variables after `steps` updates (by `make_optimizer()`, built in the strategy's scope) of
  a kernel (decayed), a bias and a [4, 3] table."""
  rng = np.random.RandomState(7)
  initial = [rng.normal(size=(5, 3)), rng.normal(size=(3,)), rng.normal(size=(4, 3))]
  gradients = [[tf.constant(rng.normal(size=v.shape), tf.float32) for v in initial]
               for _ in range(steps)]
  with strategy.scope():
    optimizer = make_optimizer()
    variables = [keras.Variable(value.astype(np.float32), name=name)
                 for value, name in zip(initial, ('kernel', 'bias', 'cluster_centers'))]
    optimizer.exclude_from_weight_decay(var_list=variables[1:])
    optimizer.build(variables)

  @tf.function
  def apply(grads):
    def replica_step():
      # Gradients as a replica computes them (each replica's are summed across replicas).
      with tf.GradientTape() as tape:
        value = tf.add_n([tf.reduce_sum(v * g) for v, g in zip(variables, grads)])
      optimizer.apply(tape.gradient(value, variables), variables)
    strategy.run(replica_step)

  for grads in gradients:
    apply(grads)
  return [np.asarray(v.numpy()) for v in variables]


class _NoUpdate(keras.optimizers.SGD):
  """Builds like an optimizer; `_run_updates(..., steps=0)` returns the initial values."""


@pytest.mark.parametrize('name', ['adam', 'adamw'])
def test_fused_adam_update_equals_keras(name):
  # The fused update (one ResourceApplyAdam per variable, the rate computed once) against
  # Keras' own optimizer: three steps of a decaying rate, decay on the kernel only; on one
  # device and mirrored over two logical CPUs.
  step = tf.Variable(0, dtype=tf.int64)
  solver = _solver(optimizer=name, adamw_weight_decay=0.3, base_learning_rate=0.05)
  schedule = schedule_lib.LearningRateSchedule.from_solver(solver, 1.0)
  rate = lambda: schedule(step)  # pylint: disable=unnecessary-lambda-assignment
  reference_class = keras.optimizers.AdamW if name == 'adamw' else keras.optimizers.Adam
  kwargs = {'weight_decay': 0.3} if name == 'adamw' else {}
  devices = tf.config.list_logical_devices('CPU')
  strategies = [tf.distribute.get_strategy()]
  if len(devices) >= 2:
    strategies.append(tf.distribute.MirroredStrategy([d.name for d in devices[:2]]))
  for strategy in strategies:
    results = []
    for make in (lambda: optimizer_lib.make_optimizer(solver, rate, []),
                 lambda: reference_class(rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                                         **kwargs)):
      step.assign(100)
      results.append(_run_updates(make, strategy))
    # Compared as updates (final - initial). TF's kernel forms 1 - beta_2 in float32
    # (1 - 0.999f = 0.00099998713; Keras 3: 0.001 rounded once), a relative 1.3e-5 in the
    # second moment and 6.4e-6 in each step: the rounding of DeepLab2's Keras 2 Adam, which
    # runs this kernel. atol: a few float32 ulps of the variables (|v| < 3) over three steps.
    initial = _run_updates(_NoUpdate, strategy, steps=0)
    for ours, reference, start in zip(*results, initial):
      np.testing.assert_allclose(ours - start, reference - start, rtol=3e-5, atol=1e-6)
      assert np.abs(ours - start).min() > 1e-3  # every entry moved


def test_fused_adam_update_equals_keras_on_two_replicas():
  # The same comparison on MirroredStrategy over two logical CPUs (device setup must precede
  # TF's initialisation, so in a fresh process): the step's scalars are per replica there.
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from tests.conftest import REPO_ROOT  # pylint: disable=g-import-not-at-top
  script = (
      'import tensorflow as tf\n'
      'cpu = tf.config.list_physical_devices("CPU")[0]\n'
      'tf.config.set_logical_device_configuration(\n'
      '    cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n'
      'from tests.trainer import test_schedule_and_optimizer as t\n'
      'assert len(tf.config.list_logical_devices("CPU")) == 2\n'
      'for name in ("adam", "adamw"):\n'
      '  t.test_fused_adam_update_equals_keras(name)\n'
      'print("two replicas: equal")\n')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0 and 'two replicas: equal' in result.stdout, result.stderr[-3000:]
