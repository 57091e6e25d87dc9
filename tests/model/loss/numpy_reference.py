"""Plain numpy (float64, loops) reference of the mask-transformer loss, for the tests.

Written from the formulas of reference §4 / Appendix E, independently of the TF code: masks are
built pixel by pixel, the matching is a brute-force search over permutations, and every sum is
an explicit loop where that keeps the formula visible.
"""

import itertools

import numpy as np


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def targets(semantic, thing_id, thing_class, stride, things, stuff, ignore):
  """One image: returns dict with masks [P, K], classes [K] (channel or -1), pixel flags."""
  semantic = semantic[::stride, ::stride].reshape(-1)
  thing_id = thing_id[::stride, ::stride].reshape(-1)
  num_pixels = semantic.size
  max_thing_id = len(thing_class)
  channels = list(things) + list(stuff)
  masks = np.zeros((num_pixels, max_thing_id + len(stuff)))
  for p in range(num_pixels):
    if thing_id[p] >= 0:
      masks[p, thing_id[p]] = 1
    elif semantic[p] in stuff:
      masks[p, max_thing_id + list(stuff).index(semantic[p])] = 1
  classes = list(thing_class) + list(stuff)
  channel = np.array([channels.index(c) if c >= 0 and masks[:, k].sum() > 0 else -1
                      for k, c in enumerate(classes)])
  return {'masks': masks, 'channel': channel, 'non_void_pixel': (semantic != ignore) * 1.0,
          'thing_pixel': (thing_id >= 0) * 1.0, 'area': masks.sum(0)}


def match(t, mask_logits, class_logits):
  """Brute-force matching; returns slot per mask (-1 none), dice [K, N], class sim [K, N]."""
  probs = softmax(mask_logits) * t['non_void_pixel'][:, None]
  num_masks, num_slots = t['masks'].shape[1], mask_logits.shape[1]
  class_probs = softmax(class_logits)[:, :-1]
  dice = np.zeros((num_masks, num_slots))
  sim = np.zeros((num_masks, num_slots))
  for k in range(num_masks):
    for n in range(num_slots):
      g, p = t['masks'][:, k], probs[:, n]
      dice[k, n] = (g * p).sum() / ((g.sum() + p.sum()) / 2 + 1e-5)
      sim[k, n] = class_probs[n, t['channel'][k]] if t['channel'][k] >= 0 else 0.0
  real = [k for k in range(num_masks) if t['channel'][k] >= 0]
  best, best_cost = None, np.inf
  # Only the non-void masks matter; try every injective map of them into the slots (or of
  # the slots into them when masks outnumber slots).
  if len(real) <= num_slots:
    for slots in itertools.permutations(range(num_slots), len(real)):
      cost = sum(-dice[k, n] * sim[k, n] for k, n in zip(real, slots))
      if cost < best_cost - 1e-12:
        best, best_cost = dict(zip(real, slots)), cost
  else:
    for masks in itertools.permutations(real, num_slots):
      cost = sum(-dice[k, n] * sim[k, n] for n, k in enumerate(masks))
      if cost < best_cost - 1e-12:
        best, best_cost = {k: n for n, k in enumerate(masks)}, cost
  slot = np.array([best.get(k, -1) for k in range(num_masks)])
  return slot, dice, sim


def pq_class_term(t, slot, dice, mask_logits, class_logits, alpha=0.75):
  num_slots, width = class_logits.shape
  probs = softmax(mask_logits)
  losses = []
  for n in range(num_slots):
    matched = [k for k in range(len(slot)) if slot[k] == n]
    log_q = np.log(softmax(class_logits[n]))
    if matched:
      k = matched[0]
      ce, a, w = -log_q[t['channel'][k]], alpha, max(dice[k, n], 1e-5)
    else:
      void = ((1 - t['non_void_pixel']) * probs[:, n]).sum() / (probs[:, n].sum() + 1e-5)
      ce, a, w = -log_q[width - 1], 1 - alpha, max(void, 1e-5)
    losses.append(ce * a * w)
  losses = np.array(losses)
  return losses.sum() / (losses != 0).sum()


def permuted_probs(slot, logits, num_masks):
  """Softmax over slots of each mask's matched slot; unmatched masks get a padded slot."""
  num_slots = logits.shape[1]
  size = max(num_masks, num_slots)
  padded = np.concatenate([logits, np.full((logits.shape[0], size - num_slots), -99999.0)], 1)
  probs = softmax(padded)
  out = np.zeros((logits.shape[0], num_masks))
  for k in range(num_masks):
    if slot[k] >= 0:
      out[:, k] = probs[:, slot[k]]
  return out


def pq_dice_term(t, slot, sim, logits, alpha=0.75):
  num_masks = t['masks'].shape[1]
  probs = permuted_probs(slot, logits, num_masks)
  valid = t['masks'].sum(1)
  total = 0.0
  for k in range(num_masks):
    if t['channel'][k] < 0:
      continue
    g, p = t['masks'][:, k], probs[:, k] * valid
    loss = 1 - (2 * (g * p).sum() + 1) / (g.sum() + p.sum() + 1)
    prob = sim[k, slot[k]] if slot[k] >= 0 else 0.0
    total += loss * max(prob, 1e-5)
  return total * alpha / logits.shape[1]


def mask_id_ce(t, slot, logits):
  """Pixels of matched masks: -log of their slot's probability among all (padded) slots."""
  num_masks = t['masks'].shape[1]
  probs = permuted_probs(slot, logits, num_masks)
  losses = []
  for p in range(logits.shape[0]):
    ks = np.nonzero(t['masks'][p])[0]
    if t['non_void_pixel'][p] and len(ks):
      losses.append(-np.log(probs[p, ks[0]]))
  losses = np.array(losses)
  return losses.sum() / (losses != 0).sum()


def prototype_instance_discrimination(t, feature, temperature=0.3):
  num_masks = t['masks'].shape[1]
  prototypes = []
  for k in range(num_masks):
    mean = (feature * t['masks'][:, k:k + 1]).sum(0) / max(t['area'][k], 1)
    prototypes.append(mean / max(np.linalg.norm(mean), 1e-6))
  prototypes = np.array(prototypes)
  valid = [k for k in range(num_masks) if t['channel'][k] >= 0]
  losses = []
  for p in range(feature.shape[0]):
    if not t['thing_pixel'][p]:
      continue
    k = int(np.argmax(t['masks'][p]))
    logits = np.array([feature[p] @ prototypes[j] / temperature for j in valid])
    losses.append(-np.log(softmax(logits)[valid.index(k)]))
  losses = np.array(losses)
  return losses.sum() / (losses != 0).sum()


def pixel_contrastive(t, feature, pixels, temperature=0.3):
  """Loss on the given sampled pixel indices."""
  mask_of = [int(np.argmax(t['masks'][p])) if t['masks'][p].sum() else -1 for p in pixels]
  losses = []
  for i, p in enumerate(pixels):
    if mask_of[i] < 0:
      continue
    same = [j for j in range(len(pixels)) if mask_of[j] == mask_of[i]]
    log_q = np.log(softmax(np.array([feature[p] @ feature[q] for q in pixels]) / temperature))
    losses.append(-sum(log_q[j] for j in same) / len(same))
  losses = np.array(losses)
  return losses.sum() / (losses != 0).sum()


def semantic_ce(logits, labels, weights, ignore, top_k=1.0):
  losses = []
  for y in range(labels.shape[0]):
    for x in range(labels.shape[1]):
      if labels[y, x] == ignore or labels[y, x] >= logits.shape[-1]:
        losses.append(0.0)
        continue
      losses.append(-np.log(softmax(logits[y, x])[labels[y, x]]) * weights[y, x])
  losses = np.sort(np.array(losses))[::-1]
  losses = losses[:max(1, int(round(top_k * losses.size)))]
  return losses.sum() / max((losses != 0).sum(), 1)
