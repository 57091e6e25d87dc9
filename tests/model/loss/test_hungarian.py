"""Hungarian matcher against scipy.optimize.linear_sum_assignment (test-only dependency)."""

import numpy as np
import pytest
from scipy import optimize
import tensorflow as tf

from deeplab2_kmax.model.loss import hungarian

# One trace serves every shape, so the 500+ cases cost one graph build.
_SOLVE = tf.function(hungarian.linear_sum_assignment,
                     input_signature=[tf.TensorSpec([None, None, None], tf.float64)])
# Large problems run compiled: the XLA build costs about a second per shape, and the solve
# itself is then ~10x faster than graph mode.
_SOLVE_XLA = tf.function(hungarian.linear_sum_assignment, jit_compile=True)


def _check_batch(costs, assignment, atol):
  """Asserts that each assignment is a valid matching with scipy's optimal total cost."""
  batch, rows, cols = costs.shape
  assert assignment.shape == (batch, rows)
  for cost, chosen in zip(costs, assignment):
    assigned = chosen >= 0
    assert assigned.sum() == min(rows, cols)
    assert len(set(chosen[assigned].tolist())) == min(rows, cols)
    assert chosen.max() < cols
    ref_rows, ref_cols = optimize.linear_sum_assignment(cost)
    expected = cost[ref_rows, ref_cols].sum()
    total = cost[np.nonzero(assigned)[0], chosen[assigned]].sum()
    np.testing.assert_allclose(total, expected, rtol=0, atol=atol)


def _cases():
  """(name, costs) with 510 problems in all; ties come from small integer costs."""
  rng = np.random.default_rng(2024)
  cases = []
  for index in range(44):  # 440 small problems, square and rectangular.
    rows, cols = rng.integers(1, 11, size=2)
    if index % 2:
      costs = rng.integers(0, 3, size=(10, rows, cols)).astype(np.float64)  # Many ties.
    else:
      costs = rng.normal(size=(10, rows, cols))
    cases.append((f'small{index}_{rows}x{cols}', costs))
  for index, (rows, cols) in enumerate([(20, 20), (25, 25), (33, 17), (17, 33), (40, 40),
                                        (64, 50), (50, 64), (60, 60), (80, 80), (100, 100)]):
    costs = rng.uniform(-1, 0, size=(6, rows, cols))  # 60 medium problems.
    if index % 3 == 0:
      costs = np.round(costs * 4) / 4
    cases.append((f'medium_{rows}x{cols}', costs))
  cases.append(('large_256x256', rng.normal(size=(2, 256, 256))))
  cases.append(('large_200x256', rng.uniform(size=(2, 200, 256))))
  cases.append(('large_256x180', rng.integers(0, 5, size=(2, 256, 180)).astype(np.float64)))
  # The loss's layout: 128 slots (columns) against 181 GT masks (rows) where the void GT
  # rows are +999 (more GT rows than slots) or -999, then padded to the square with -999.
  padded = rng.uniform(-1, 0, size=(4, 181, 181))
  for b, num_void in enumerate([0, 40, 120, 181]):
    padded[b, 181 - num_void:, :] = 999.0 if b % 2 else -999.0
  padded[:, :, 128:] = -999.0
  cases.append(('loss_padded_181', padded))
  return cases


CASES = _cases()


def test_at_least_500_problems():
  assert sum(costs.shape[0] for _, costs in CASES) >= 500


@pytest.mark.parametrize('name,costs', CASES, ids=[name for name, _ in CASES])
def test_total_cost_equals_scipy(name, costs):
  solve = _SOLVE_XLA if name.startswith(('large', 'loss')) else _SOLVE
  assignment = solve(tf.constant(costs)).numpy()
  # float64 throughout: the only difference from scipy is summation order.
  _check_batch(costs, assignment, atol=1e-9 * max(1.0, np.abs(costs).max()) * costs.shape[1])


def test_float32_within_stated_tolerance():
  rng = np.random.default_rng(7)
  costs = rng.uniform(-1, 0, size=(3, 100, 100)).astype(np.float32)
  assignment = _SOLVE_XLA(tf.constant(costs)).numpy()
  # Potentials are sums of up to n float32 steps, so a choice can only differ from the exact
  # one between assignments closer than n * eps * max|cost| (about 1.2e-5 here).
  tolerance = 100 * np.finfo(np.float32).eps * 1.0
  _check_batch(costs.astype(np.float64), assignment, atol=tolerance)


def test_compiles_with_xla():
  rng = np.random.default_rng(3)
  for shape in [(3, 30, 30), (2, 24, 40)]:
    costs = rng.normal(size=shape)
    _check_batch(costs, _SOLVE_XLA(tf.constant(costs)).numpy(), atol=1e-9)


def test_boolean_matrix_form():
  costs = np.array([[[4., 1., 3.], [2., 0., 5.]]])  # Optimum: row0->col1 (1) + row1->col0 (2).
  matrix = hungarian.hungarian_matching(tf.constant(costs)).numpy()
  np.testing.assert_array_equal(matrix, [[[False, True, False], [True, False, False]]])


def test_more_rows_than_columns_leaves_rows_unassigned():
  costs = np.array([[[5.], [1.], [3.]]])
  np.testing.assert_array_equal(hungarian.linear_sum_assignment(tf.constant(costs)).numpy(),
                                [[-1, 0, -1]])


def test_rejects_wrong_rank():
  with pytest.raises(ValueError, match='batch, rows, cols'):
    hungarian.linear_sum_assignment(tf.zeros([3, 3]))


def test_non_finite_costs_terminate_with_a_valid_matching():
  costs = np.array([[[1., np.nan, 3.], [np.inf, 2., 0.], [4., 5., -np.inf]]])
  assignment = _SOLVE(tf.constant(costs)).numpy()[0]
  assert sorted(assignment.tolist()) == [0, 1, 2]
  # NaN and Inf count as 5, the largest finite |cost|.
  replaced = np.where(np.isfinite(costs[0]), costs[0], 5.0)
  rows, cols = optimize.linear_sum_assignment(replaced)
  assert replaced[np.arange(3), assignment].sum() == replaced[rows, cols].sum()
