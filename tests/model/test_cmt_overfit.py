"""Overfit test for CMT-DeepLab (issue #10): the tiny model of tests/model/test_overfit.py with
the CMT decoder (cluster-axis soft assignment, pixel update, coordinate features, reference
masks and their loss) trained on one synthetic image cuts the total loss by >= 80% and its
post-processed prediction scores PQ >= 0.9 against that image's ground truth.

Same recipe as the kMaX overfit test (its docstring gives the reason for each choice: output
stride 2, prototype instance discrimination, Adam 1e-2, BN momentum 0.9, scene 214); the only
differences are the meta-architecture and the reference-mask loss (weight 1.0). Measured
2026-11-24 on the 2-core machine at load ~1.5: loss 13.40 -> 2.50 (81.3% cut), PQ 0.954 after
200 steps in 85 s; after 150 steps the cut was 79.5%.
"""

from google.protobuf import text_format

from tests.model import overfit
from tests.model.test_overfit import tiny_kmax_overfit_options


def tiny_cmt_overfit_options():
  options = tiny_kmax_overfit_options()
  decoder_text = text_format.MessageToString(options.model_options.kmax)
  options.model_options.ClearField('kmax')
  text_format.Merge(decoder_text, options.model_options.cmt)  # the shared fields mean the same
  options.trainer_options.loss_options.reference_mask_loss.weight = 1.0
  return options


# ~1.5 min on 2 idle cores (~4 min on a loaded machine): run by CI, the suite has room for it.
def test_tiny_cmt_overfits_one_synthetic_image():
  options = tiny_cmt_overfit_options()
  assert options.model_options.cmt.use_reference_masks
  result = overfit.overfit_one_image(options, steps=200, learning_rate=1e-2, scene_seed=214)
  print(f'total loss {result.losses[0]:.3f} -> {result.losses[-1]:.3f} '
        f'({result.loss_reduction:.1%} cut), PQ {result.pq:.3f}, {result.seconds:.0f} s')
  assert result.loss_reduction >= 0.8, result.losses[::10]
  assert result.pq >= 0.9, result.pq_results
