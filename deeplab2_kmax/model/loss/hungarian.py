"""Batched minimum-cost bipartite matching (Hungarian algorithm) as TensorFlow ops.

The algorithm is the O(n^3) shortest-augmenting-path form with dual potentials (Kuhn-Munkres
as refined by Jonker and Volgenant): rows are added one at a time, and each addition grows a
Dijkstra-like tree over the columns, using reduced costs `cost - u[row] - v[col]`, until it
reaches a free column; the path is then flipped. Every per-column step is a vector op over all
columns of all batch elements, so a batch runs in lock step inside `tf.while_loop`s, in graph
mode, in `tf.function` and under XLA (`jit_compile=True`).

Rectangular costs are padded to a square with zeros: every complete matching of the square uses
exactly |rows - cols| padded entries, so padding with a constant does not change which real
entries are optimal.

Computation runs in the cost's dtype. With float64 the total cost equals an exact solver's up to
rounding; with float32 the potentials accumulate rounding error of roughly
`n * eps * max|cost|`, which can only flip the choice between assignments whose totals differ
by less than that.
"""

import tensorflow as tf


def _keep_shapes(new, old):
  """Restores static shapes that some ops (scatter, where) lose, as tf.while_loop requires."""
  for new_tensor, old_tensor in zip(new, old):
    new_tensor.set_shape(old_tensor.shape)
  return new


def _solve_square(cost: tf.Tensor) -> tf.Tensor:
  """Solves square problems.

  Args:
    cost: float [batch, n, n].

  Returns:
    int32 [batch, n + 1]: entry j >= 1 is the 1-based row assigned to the 1-based column j
    (entry 0 is scratch).
  """
  dtype = cost.dtype
  batch = tf.shape(cost)[0]
  n = tf.shape(cost)[1]
  # Index 0 of rows and columns is the algorithm's virtual start node; padding the cost with a
  # zero row and column keeps gathers 1-based like the textbook form.
  cost = tf.pad(cost, [[0, 0], [1, 0], [1, 0]])
  inf = tf.constant(float('inf'), dtype)
  batch_index = tf.range(batch)
  column_index = tf.range(n + 1)

  def phase(row, u, v, p):
    """Adds `row` (1-based) to the matching of every batch element."""
    state = (u, v, p)
    p = tf.concat([tf.fill([batch, 1], row), p[:, 1:]], axis=1)
    j0 = tf.zeros([batch], tf.int32)
    minv = tf.fill([batch, n + 1], inf)
    way = tf.zeros([batch, n + 1], tf.int32)
    used = tf.zeros([batch, n + 1], tf.bool)
    active = tf.ones([batch], tf.bool)

    def grow_cond(active, *unused):
      return tf.reduce_any(active)

    def grow_body(*state):
      active, j0, u, v, minv, way, used = state
      used = tf.logical_or(used, tf.logical_and(
          active[:, None], tf.equal(column_index[None, :], j0[:, None])))
      i0 = tf.gather(p, j0, batch_dims=1)
      reduced = (tf.gather(cost, i0, batch_dims=1) - tf.gather(u, i0, batch_dims=1)[:, None]
                 - v)
      # Finished elements must keep `way` intact: the flip loop below walks it.
      improve = tf.logical_and(tf.logical_and(tf.logical_not(used), reduced < minv),
                               active[:, None])
      minv = tf.where(improve, reduced, minv)
      way = tf.where(improve, j0[:, None], way)
      candidates = tf.where(used, inf, minv)
      j1 = tf.argmin(candidates, axis=1, output_type=tf.int32)
      delta = tf.reduce_min(candidates, axis=1)
      # Finished batch elements take a zero step so that nothing of theirs changes.
      delta = tf.where(active, delta, tf.zeros_like(delta))
      # Rows on the tree (the rows of used columns) rise by delta, used columns fall by delta;
      # p restricted to used columns is injective, so the scatter-add has no collisions.
      u = tf.tensor_scatter_nd_add(
          u, tf.stack([tf.repeat(batch_index, n + 1), tf.reshape(p, [-1])], axis=1),
          tf.reshape(tf.where(used, delta[:, None], tf.zeros_like(minv)), [-1]))
      v = tf.where(used, v - delta[:, None], v)
      minv = tf.where(used, minv, minv - delta[:, None])
      j0 = tf.where(active, j1, j0)
      active = tf.logical_and(active, tf.not_equal(tf.gather(p, j0, batch_dims=1), 0))
      return _keep_shapes((active, j0, u, v, minv, way, used), state)

    _, j0, u, v, _, way, _ = tf.while_loop(
        grow_cond, grow_body, (active, j0, u, v, minv, way, used))

    def flip_cond(j0, p):
      return tf.reduce_any(j0 > 0)

    def flip_body(j0, p):
      p_in = p
      j1 = tf.gather(way, j0, batch_dims=1)
      # Elements already back at the start node rewrite p[0] with itself.
      p = tf.tensor_scatter_nd_update(
          p, tf.stack([batch_index, j0], axis=1), tf.gather(p, j1, batch_dims=1))
      return _keep_shapes((j1, p), (j0, p_in))

    _, p = tf.while_loop(flip_cond, flip_body, (j0, p))
    return (row + 1,) + _keep_shapes((u, v, p), state)

  u = tf.zeros([batch, n + 1], dtype)
  v = tf.zeros([batch, n + 1], dtype)
  p = tf.zeros([batch, n + 1], tf.int32)
  _, _, _, p = tf.while_loop(lambda row, *unused: row <= n, phase,
                             (tf.constant(1, tf.int32), u, v, p))
  return p


def linear_sum_assignment(cost: tf.Tensor) -> tf.Tensor:
  """Minimum-cost assignment of rows to columns, batched.

  Args:
    cost: float [batch, rows, cols] (float32 or float64). Non-finite entries count as the
      problem's largest finite |cost|.

  Returns:
    int32 [batch, rows]: the column assigned to each row, -1 for the rows left unassigned when
    rows > cols. Every column is used at most once and min(rows, cols) pairs are made.
  """
  cost = tf.convert_to_tensor(cost)
  if cost.shape.rank != 3:
    raise ValueError(f'cost must be [batch, rows, cols], got shape {cost.shape}.')
  if not cost.dtype.is_floating:
    cost = tf.cast(cost, tf.float32)
  if cost.dtype in (tf.float16, tf.bfloat16):
    cost = tf.cast(cost, tf.float32)
  # A NaN or Inf entry would stall the search (no finite reduced cost to step to); such
  # entries get the largest finite cost of their problem instead, so the solver always ends.
  finite = tf.math.is_finite(cost)
  largest = tf.reduce_max(tf.where(finite, tf.abs(cost), tf.zeros_like(cost)), axis=[1, 2],
                          keepdims=True)
  cost = tf.where(finite, cost, largest)
  rows = tf.shape(cost)[1]
  cols = tf.shape(cost)[2]
  size = tf.maximum(rows, cols)
  square = tf.pad(cost, [[0, 0], [0, size - rows], [0, size - cols]])
  column_to_row = _solve_square(square)[:, 1:] - 1  # [batch, size], 0-based rows.
  batch = tf.shape(cost)[0]
  row_to_column = tf.scatter_nd(
      tf.stack([tf.repeat(tf.range(batch), size), tf.reshape(column_to_row, [-1])], axis=1),
      tf.tile(tf.range(size), [batch]), tf.stack([batch, size]))
  row_to_column = row_to_column[:, :rows]
  row_to_column = tf.where(row_to_column < cols, row_to_column, -tf.ones_like(row_to_column))
  row_to_column.set_shape(cost.shape[:2])
  return row_to_column


def hungarian_matching(cost: tf.Tensor) -> tf.Tensor:
  """Minimum-cost assignment as a boolean matrix.

  Args:
    cost: float [batch, rows, cols].

  Returns:
    bool [batch, rows, cols]: True where row i is assigned to column j.
  """
  cost = tf.convert_to_tensor(cost)
  assignment = linear_sum_assignment(cost)
  return tf.cast(tf.one_hot(assignment, tf.shape(cost)[2], dtype=tf.int32), tf.bool)
