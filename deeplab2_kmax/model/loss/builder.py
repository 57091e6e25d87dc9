"""Builds the training loss from an experiment config.

    loss = build_loss(experiment_options, descriptor)
    losses = loss(ground_truth_batch, model_outputs)

The number of auxiliary outputs follows the meta-architecture: one per transformer-decoder
layer for kMaX and CMT (default num_blocks [2, 2, 2] -> 6), none for MaX-DeepLab; pass
`num_aux_outputs` to override (e.g. 0 for an evaluation loss).
"""

from typing import Optional

from deeplab2_kmax.model.loss import mask_transformer_loss

_DEFAULT_DECODER_BLOCKS = (2, 2, 2)


def default_num_aux_outputs(model_options) -> int:
  """Auxiliary outputs a training forward pass returns for these ModelOptions."""
  architecture = model_options.WhichOneof('meta_architecture')
  if architecture in ('kmax', 'cmt'):
    decoder = getattr(model_options, architecture).transformer_decoder
    return sum(decoder.num_blocks) if decoder.num_blocks else sum(_DEFAULT_DECODER_BLOCKS)
  return 0


def build_loss(experiment_options, descriptor,
               num_aux_outputs: Optional[int] = None) -> mask_transformer_loss.MaskTransformerLoss:
  """The MaskTransformerLoss for an ExperimentOptions and its dataset descriptor."""
  model_options = experiment_options.model_options
  architecture = model_options.WhichOneof('meta_architecture')
  if architecture is None:
    raise ValueError('model_options has no meta-architecture (kmax, cmt or max_deeplab); the '
                     'mask-transformer loss needs one.')
  meta = getattr(model_options, architecture)
  if num_aux_outputs is None:
    num_aux_outputs = default_num_aux_outputs(model_options)
  max_thing_id = None
  if experiment_options.HasField('train_dataset_options'):
    max_thing_id = experiment_options.train_dataset_options.max_thing_id
  return mask_transformer_loss.MaskTransformerLoss(
      experiment_options.trainer_options.loss_options, descriptor,
      num_aux_outputs=num_aux_outputs,
      sample_k=meta.instance_discrimination_sample_k,
      sample_temperature=meta.instance_discrimination_sample_temperature,
      max_thing_id=max_thing_id)
