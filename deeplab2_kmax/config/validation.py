"""Semantic checks of an ExperimentOptions beyond what the proto schema can say.

find_problems() returns every problem at once, each naming the dotted field path, the value
and what would be right; config.loader turns them into a message with file:line.
"""

import dataclasses
import math
import re

from deeplab2_kmax import common
from deeplab2_kmax.data import datasets
from deeplab2_kmax.model import builder
from deeplab2_kmax.model import recompute
from deeplab2_kmax.model.pixel_decoder import kmax as kmax_pixel_decoder
from deeplab2_kmax.protos import config_pb2

AUTOAUGMENT_POLICIES = ('', 'simple_classification_policy',
                        'simple_classification_policy_magnitude_scale_0.2')
COPY_PASTE_OPTIONS = ('random', 'none', 'all')
OPTIMIZERS = ('adam', 'adamw', 'sgd')
LEARNING_POLICIES = ('poly', 'cosine')
PRECISION_POLICIES = ('float32', 'mixed_bfloat16', 'mixed_float16')
RAW_PANOPTIC_FORMATS = ('two_channel_png', 'three_channel_png', 'two_channel_numpy_array')
EXPORT_INPUT_TYPES = ('image_tensor', 'image_bytes', 'tf_example')
DUAL_PATH_ACTIVATIONS = ('relu', 'gelu')
# Output stride of the dual-path network (max_deeplab uses 16).
MAX_DEEPLAB_OUTPUT_STRIDE = 16


@dataclasses.dataclass(frozen=True)
class Problem:
  field: str
  message: str


def nearest_valid_crop(size: int) -> int:
  return max(1, round((size - 1) / common.ENCODER_OUTPUT_STRIDE)) * common.ENCODER_OUTPUT_STRIDE + 1


def _in_unit_interval(value, low_open=False):
  return (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)


class _Checker:
  """Collects problems; `check(ok, field, message)` records one when ok is False."""

  def __init__(self):
    self.problems: list[Problem] = []

  def check(self, ok: bool, field: str, message: str) -> bool:
    if not ok:
      self.problems.append(Problem(field, message))
    return ok


def _check_dataset(c: _Checker, options, prefix: str, num_replicas: int, required_crop: bool):
  descriptor = None
  source = options.WhichOneof('dataset_source')
  if source is None:
    c.check(False, f'{prefix}.dataset',
            'no dataset given; set dataset: "<name>" (one of '
            f'{", ".join(datasets.BUILT_IN_DATASET_NAMES)}) or dataset_descriptor {{ ... }}')
  elif source == 'dataset':
    if c.check(options.dataset in datasets.BUILT_IN_DATASET_NAMES, f'{prefix}.dataset',
               f'"{options.dataset}" is not a built-in dataset; use one of '
               f'{", ".join(datasets.BUILT_IN_DATASET_NAMES)} or describe it inline with '
               'dataset_descriptor { ... }'):
      descriptor = datasets.get_built_in(options.dataset)
  else:
    inline = options.dataset_descriptor
    field = f'{prefix}.dataset_descriptor'
    n = len(inline.class_names)
    ok = c.check(n > 0, f'{field}.class_names', 'is empty; list one name per class')
    ok &= c.check(len(inline.class_has_instances) == n, f'{field}.class_has_instances',
                  f'has {len(inline.class_has_instances)} entries but class_names has {n}; '
                  'give one true/false per class')
    ok &= c.check(len(inline.colors) in (0, n), f'{field}.colors',
                  f'has {len(inline.colors)} entries; give none or one per class ({n})')
    for i, color in enumerate(inline.colors):
      try:
        datasets.parse_color(color)
      except ValueError as error:
        ok &= c.check(False, f'{field}.colors', f'entry {i}: {error}')
    ok &= c.check(len(inline.category_ids) in (0, n), f'{field}.category_ids',
                  f'has {len(inline.category_ids)} entries; give none or one per class ({n})')
    ok &= c.check(len(set(inline.class_names)) == n, f'{field}.class_names',
                  'contains duplicate names')
    ok &= c.check(inline.panoptic_label_divisor > 0, f'{field}.panoptic_label_divisor',
                  f'is {inline.panoptic_label_divisor}; it must be positive')
    if 0 <= inline.ignore_label < len(inline.class_has_instances):
      ok &= c.check(not inline.class_has_instances[inline.ignore_label], f'{field}.ignore_label',
                    f'{inline.ignore_label} is flagged as a thing class; the ignore (void) '
                    'class cannot have instances')
    if ok:
      descriptor = datasets.from_inline_options(inline)

  crop = list(options.crop_size)
  if required_crop or crop:
    if c.check(len(crop) in (1, 2), f'{prefix}.crop_size',
               f'has {len(crop)} values; give [height, width] (or one value for a square)'):
      for size in crop:
        c.check(size > 0 and (size - 1) % common.ENCODER_OUTPUT_STRIDE == 0, f'{prefix}.crop_size',
                f'{size} is not of the form k*{common.ENCODER_OUTPUT_STRIDE}+1 required by the encoders '
                f'(nearest valid size: {nearest_valid_crop(size)})')
  for name in ('min_resize_value', 'max_resize_value'):
    values = list(getattr(options, name))
    c.check(len(values) <= 2, f'{prefix}.{name}',
            f'has {len(values)} values; give none, one (shorter/longer side) or [height, width]')
  c.check(options.resize_factor >= 0, f'{prefix}.resize_factor',
          f'is {options.resize_factor}; it must be >= 0 (0 = off)')
  if c.check(options.batch_size > 0, f'{prefix}.batch_size',
             f'is {options.batch_size}; it must be positive'):
    c.check(options.batch_size % num_replicas == 0, f'{prefix}.batch_size',
            f'{options.batch_size} is not divisible by the {num_replicas} replicas of this run; '
            f'use a multiple of {num_replicas}')
  if descriptor is not None:
    c.check(0 < options.max_thing_id < descriptor.panoptic_label_divisor,
            f'{prefix}.max_thing_id',
            f'{options.max_thing_id} must be positive and below the panoptic label divisor '
            f'({descriptor.panoptic_label_divisor}) of dataset "{descriptor.name}"')
  c.check(options.small_instance_threshold >= 0, f'{prefix}.small_instance_threshold',
          'must be >= 0')
  c.check(options.small_instance_weight >= 0, f'{prefix}.small_instance_weight', 'must be >= 0')
  c.check(options.shuffle_buffer_size > 0, f'{prefix}.shuffle_buffer_size', 'must be positive')
  c.check(options.cycle_length > 0, f'{prefix}.cycle_length', 'must be positive')

  aug = options.augmentations
  field = f'{prefix}.augmentations'
  c.check(0 < aug.min_scale_factor <= aug.max_scale_factor, f'{field}.min_scale_factor',
          f'scale range [{aug.min_scale_factor:g}, {aug.max_scale_factor:g}] is invalid; need '
          '0 < min_scale_factor <= max_scale_factor')
  c.check(aug.scale_factor_step_size >= 0, f'{field}.scale_factor_step_size', 'must be >= 0')
  c.check(aug.autoaugment_policy_name in AUTOAUGMENT_POLICIES,
          f'{field}.autoaugment_policy_name',
          f'"{aug.autoaugment_policy_name}" is unknown; use one of '
          f'{", ".join(repr(p) for p in AUTOAUGMENT_POLICIES)}')
  c.check(_in_unit_interval(aug.horizontal_flip_probability),
          f'{field}.horizontal_flip_probability',
          f'{aug.horizontal_flip_probability:g} is not in [0, 1]')
  paste = aug.panoptic_copy_paste
  c.check(paste.panoptic_copy_paste_scale >= 0, f'{field}.panoptic_copy_paste.'
          'panoptic_copy_paste_scale', 'must be >= 0 (0 = off)')
  for name in ('thing', 'stuff', 'void'):
    value = getattr(paste, f'panoptic_copy_paste_{name}_option')
    c.check(value in COPY_PASTE_OPTIONS,
            f'{field}.panoptic_copy_paste.panoptic_copy_paste_{name}_option',
            f'"{value}" is unknown; use one of {", ".join(COPY_PASTE_OPTIONS)}')
  if descriptor is not None and paste.panoptic_copy_paste_scale > 0:
    c.check(2 * options.max_thing_id <= descriptor.panoptic_label_divisor,
            f'{prefix}.max_thing_id',
            f'{options.max_thing_id} is too large for panoptic copy-paste, which renumbers '
            'pasted instances into the upper half of the label divisor '
            f'({descriptor.panoptic_label_divisor}); use at most '
            f'{descriptor.panoptic_label_divisor // 2}')
  return descriptor


def _check_head(c, head, field, need_output):
  c.check(head.head_channels > 0, f'{field}.head_channels',
          f'is {head.head_channels}; it must be positive')
  if need_output:
    c.check(head.output_channels > 0, f'{field}.output_channels',
            f'is {head.output_channels}; it must be positive')


def _check_clustering_decoder(c: _Checker, meta, field: str):
  """Checks fields shared by kmax and cmt."""
  c.check(meta.num_cluster_centers > 0, f'{field}.num_cluster_centers',
          f'is {meta.num_cluster_centers}; it must be positive')
  hr = meta.high_resolution_output_stride
  valid_strides = sorted(kmax_pixel_decoder.STAGE_STRIDES)
  if not c.check(hr in valid_strides, f'{field}.high_resolution_output_stride',
                 f'is {hr}; use {", ".join(map(str, valid_strides[:-1]))} or '
                 f'{valid_strides[-1]}'):
    return
  strides = kmax_pixel_decoder.stage_strides(hr)
  has_defaults = hr in kmax_pixel_decoder.STRIDES_WITH_DEFAULTS
  pd = meta.pixel_decoder
  for name in ('dims', 'num_blocks', 'block_types'):
    values = list(getattr(pd, name))
    if values or has_defaults:
      c.check(len(values) in (0, len(strides)), f'{field}.pixel_decoder.{name}',
              f'has {len(values)} entries, but high_resolution_output_stride {hr} gives '
              f'{len(strides)} decoder stages (strides {strides}); give {len(strides)} or none')
    else:
      # The builder would stop on it: DeepLab2's defaults exist for these strides only.
      c.check(False, f'{field}.pixel_decoder.{name}',
              f'is empty, and high_resolution_output_stride {hr} has no default decoder '
              f'(DeepLab2 defines one for '
              f'{" and ".join(map(str, kmax_pixel_decoder.STRIDES_WITH_DEFAULTS))}); give '
              f'{len(strides)} entries, one per decoder stage (strides {strides})')
  c.check(all(v > 0 for v in pd.dims), f'{field}.pixel_decoder.dims', 'must be positive')
  c.check(all(v > 0 for v in pd.num_blocks), f'{field}.pixel_decoder.num_blocks',
          'must be positive')
  for value in pd.block_types:
    c.check(value in builder.PIXEL_DECODER_BLOCK_TYPES, f'{field}.pixel_decoder.block_types',
            f'"{value}" is unknown; use {" or ".join(builder.PIXEL_DECODER_BLOCK_TYPES)}')
  c.check(_in_unit_interval(pd.drop_path_keep_prob, low_open=True),
          f'{field}.pixel_decoder.drop_path_keep_prob',
          f'{pd.drop_path_keep_prob:g} is not in (0, 1]')
  td = meta.transformer_decoder
  num_blocks = list(td.num_blocks) or list(builder.DEFAULT_TRANSFORMER_NUM_BLOCKS)
  td_strides = list(td.strides) or list(builder.DEFAULT_TRANSFORMER_STRIDES)
  c.check(len(num_blocks) == len(td_strides), f'{field}.transformer_decoder.num_blocks',
          f'has {len(num_blocks)} entries but strides has {len(td_strides)}; give one block '
          'count per stride')
  c.check(all(v >= 0 for v in num_blocks), f'{field}.transformer_decoder.num_blocks',
          'must be >= 0')
  for stride in td_strides:
    c.check(stride in strides, f'{field}.transformer_decoder.strides',
            f'{stride} is not a pixel-decoder stride; choose from {strides}')
  c.check(td.channels > 0 and td.num_heads > 0, f'{field}.transformer_decoder.channels',
          'channels and num_heads must be positive')
  if td.num_heads > 0:
    for name in ('key_channels', 'value_channels'):
      value = getattr(td, name)
      c.check(value > 0 and value % td.num_heads == 0, f'{field}.transformer_decoder.{name}',
              f'{value} is not a positive multiple of num_heads ({td.num_heads})')
  c.check(td.ffn_channels > 0, f'{field}.transformer_decoder.ffn_channels', 'must be positive')
  c.check(_in_unit_interval(meta.transformer_decoder_drop_path_keep_prob, low_open=True),
          f'{field}.transformer_decoder_drop_path_keep_prob',
          f'{meta.transformer_decoder_drop_path_keep_prob:g} is not in (0, 1]')


def _is_power_of_two(value: int) -> bool:
  return value > 0 and value & (value - 1) == 0


def _check_dual_path(c: _Checker, meta, field: str):
  """Checks the max_deeplab fields the dual-path network would otherwise crash (or hang) on.

  Only fields that are set are checked: unset ones take the backbone's preset.
  """
  if meta.HasField('max_num_mask_slots'):
    if c.check(meta.max_num_mask_slots > 0, f'{field}.max_num_mask_slots',
               f'is {meta.max_num_mask_slots}; it must be positive (or unset)'):
      c.check(meta.num_mask_slots <= meta.max_num_mask_slots, f'{field}.num_mask_slots',
              f'{meta.num_mask_slots} exceeds max_num_mask_slots ({meta.max_num_mask_slots}), '
              'the rows of the memory variable; use at most max_num_mask_slots or raise it')
  dual = meta.dual_path
  field = f'{field}.dual_path'
  if dual.num_blocks:
    values = list(dual.num_blocks)
    c.check(len(values) == 4 and all(v > 0 for v in values), f'{field}.num_blocks',
            f'is {values}; give four positive block counts, one per stage (stride 4 to 32)')
  for name in ('memory_channels', 'global_feed_forward_network_channels',
               'transformer_ffn_channels', 'transformer_num_heads',
               'backbone_decoder_blocks_per_stage', 'extra_decoder_blocks_per_stage',
               'attention_bottleneck_expansion'):
    if dual.HasField(name):
      value = getattr(dual, name)
      c.check(value > 0, f'{field}.{name}', f'is {value}; it must be positive')
  for name in ('base_transformer_expansion', 'axial_key_expansion', 'axial_value_expansion',
               'transformer_bottleneck_expansion', 'transformer_key_expansion',
               'transformer_value_expansion'):
    if dual.HasField(name):
      value = getattr(dual, name)
      c.check(value > 0 and math.isfinite(value), f'{field}.{name}',
              f'is {value:g}; it must be positive')
  for name in ('backbone_decoder_num_stacks', 'extra_decoder_num_stacks'):
    if dual.HasField(name):
      value = getattr(dual, name)
      c.check(value >= 0, f'{field}.{name}', f'is {value}; it must be >= 0 (0 = no stack)')
  for name, zero in (('backbone_use_transformer_beyond_stride', 'off'),
                     ('extra_decoder_use_transformer_beyond_stride', 'off'),
                     ('use_axial_beyond_stride', 'off'),
                     ('drop_path_beyond_stride', 'every block')):
    if dual.HasField(name):
      value = getattr(dual, name)
      c.check(value == 0 or _is_power_of_two(value), f'{field}.{name}',
              f'is {value}; use a stride (a power of two such as 4, 16 or 32) or 0 ({zero})')
  transformer_strides = ('backbone_use_transformer_beyond_stride',
                         'extra_decoder_use_transformer_beyond_stride')
  if all(dual.HasField(name) and getattr(dual, name) == 0 for name in transformer_strides):
    c.check(False, f'{field}.backbone_use_transformer_beyond_stride',
            'is 0 and so is extra_decoder_use_transformer_beyond_stride; MaX-DeepLab needs '
            'dual-path transformers somewhere: set one of them to a stride (16 or 32)')
  if dual.HasField('high_resolution_output_stride'):
    hr = dual.high_resolution_output_stride
    c.check(_is_power_of_two(hr) and 2 <= hr < MAX_DEEPLAB_OUTPUT_STRIDE,
            f'{field}.high_resolution_output_stride',
            f'is {hr}; use 2, 4 or 8 (a power of two below the output stride '
            f'{MAX_DEEPLAB_OUTPUT_STRIDE})')
  if dual.HasField('activation'):
    c.check(dual.activation in DUAL_PATH_ACTIVATIONS, f'{field}.activation',
            f'"{dual.activation}" is unknown; use {" or ".join(DUAL_PATH_ACTIVATIONS)}')


def _check_model(c: _Checker, config, descriptor):
  model = config.model_options
  meta_name = model.WhichOneof('meta_architecture')
  if not c.check(meta_name is not None, 'model_options.kmax',
                 'no meta-architecture; set one of kmax { ... }, cmt { ... } or '
                 'max_deeplab { ... } in model_options'):
    return
  backbone = model.backbone
  name = builder.backbone_name(backbone.name)
  if c.check(name in builder.ENCODERS, 'model_options.backbone.name',
             f'"{backbone.name}" is not supported; use one of '
             f'{", ".join(builder.ENCODERS)}'):
    if meta_name == common.META_MAX_DEEPLAB:
      c.check(name in builder.DUAL_PATH_ENCODERS, 'model_options.backbone.name',
              f'"{backbone.name}" is not a dual-path network; max_deeplab {{ }} needs one of '
              f'{", ".join(builder.DUAL_PATH_ENCODERS)}')
    else:
      c.check(name not in builder.DUAL_PATH_ENCODERS, 'model_options.backbone.name',
              f'"{backbone.name}" is MaX-DeepLab\'s dual-path network, which only '
              f'max_deeplab {{ }} uses; {meta_name} {{ }} needs one of '
              f'{", ".join(builder.KMAX_ENCODERS)} '
              '(axial_resnet50 is the MaX-S encoder of kMaX)')
  required_os = 16 if meta_name == common.META_MAX_DEEPLAB else 32
  c.check(backbone.output_stride == required_os, 'model_options.backbone.output_stride',
          f'is {backbone.output_stride}; {meta_name} uses output stride {required_os}')
  c.check(_in_unit_interval(backbone.drop_path_keep_prob, low_open=True),
          'model_options.backbone.drop_path_keep_prob',
          f'{backbone.drop_path_keep_prob:g} is not in (0, 1]')
  c.check(backbone.drop_path_schedule in ('constant', 'linear'),
          'model_options.backbone.drop_path_schedule',
          f'"{backbone.drop_path_schedule}" is unknown; use constant or linear')
  for field in ('stem_width_multiplier', 'backbone_width_multiplier',
                'backbone_layer_multiplier'):
    value = getattr(backbone, field)
    c.check(value > 0, f'model_options.backbone.{field}', f'{value:g} must be positive')

  meta = getattr(model, meta_name)
  field = f'model_options.{meta_name}'
  _check_head(c, meta.pixel_space_head, f'{field}.pixel_space_head', need_output=True)
  use_semantic = (meta_name == common.META_MAX_DEEPLAB or meta.use_auxiliary_semantic_head)
  if use_semantic:
    _check_head(c, meta.auxiliary_semantic_head, f'{field}.auxiliary_semantic_head',
                need_output=True)
    if descriptor is not None:
      c.check(meta.auxiliary_semantic_head.output_channels == descriptor.num_classes,
              f'{field}.auxiliary_semantic_head.output_channels',
              f'is {meta.auxiliary_semantic_head.output_channels} but dataset '
              f'"{descriptor.name}" has {descriptor.num_classes} classes; they must be equal')
  for i, low in enumerate(meta.auxiliary_low_level):
    c.check(re.fullmatch(r'res[1-5]', low.feature_key or '') is not None,
            f'{field}.auxiliary_low_level', f'entry {i}: feature_key "{low.feature_key}" is '
            'not an encoder endpoint; use res2 .. res5')
    c.check(low.channels_project > 0, f'{field}.auxiliary_low_level',
            f'entry {i}: channels_project must be positive')
  c.check(meta.instance_discrimination_sample_k >= 0,
          f'{field}.instance_discrimination_sample_k', 'must be >= 0 (0 = MaX-DeepLab form)')
  c.check(meta.instance_discrimination_sample_temperature > 0,
          f'{field}.instance_discrimination_sample_temperature', 'must be positive')
  if meta_name in (common.META_KMAX, common.META_CMT):
    _check_clustering_decoder(c, meta, field)
  else:
    c.check(meta.num_mask_slots > 0, f'{field}.num_mask_slots',
            f'is {meta.num_mask_slots}; it must be positive')
    _check_dual_path(c, meta, field)
  decoder = model.decoder
  if decoder.atrous_rates:
    c.check(len(decoder.atrous_rates) == 3, 'model_options.decoder.atrous_rates',
            f'has {len(decoder.atrous_rates)} values; give three')
  c.check(decoder.decoder_conv_type in ('depthwise_separable_conv', 'standard_conv'),
          'model_options.decoder.decoder_conv_type',
          f'"{decoder.decoder_conv_type}" is unknown; use depthwise_separable_conv or '
          'standard_conv')


def _check_trainer(c: _Checker, trainer):
  solver = trainer.solver_options
  c.check(trainer.steps_per_loop > 0, 'trainer_options.steps_per_loop', 'must be positive')
  if trainer.steps_per_loop > 0:
    c.check(trainer.save_summaries_steps % trainer.steps_per_loop == 0,
            'trainer_options.save_summaries_steps',
            f'{trainer.save_summaries_steps} is not a multiple of steps_per_loop '
            f'({trainer.steps_per_loop})')
  c.check(trainer.save_checkpoints_steps > 0, 'trainer_options.save_checkpoints_steps',
          'must be positive')
  c.check(trainer.num_checkpoints_to_keep > 0, 'trainer_options.num_checkpoints_to_keep',
          'must be positive')
  c.check(trainer.mixed_precision_policy in PRECISION_POLICIES,
          'trainer_options.mixed_precision_policy',
          f'"{trainer.mixed_precision_policy}" is unknown; use one of '
          f'{", ".join(PRECISION_POLICIES)}')
  for value in trainer.recompute:
    c.check(value in recompute.PARTS, 'trainer_options.recompute',
            f'"{value}" is unknown; use one of {", ".join(recompute.PARTS)}')
  c.check(len(set(trainer.recompute)) == len(trainer.recompute), 'trainer_options.recompute',
          f'names a part twice: {list(trainer.recompute)}')
  c.check(math.isfinite(trainer.loss_upper_bound) and trainer.loss_upper_bound >= 0,
          'trainer_options.loss_upper_bound',
          f'{trainer.loss_upper_bound:g} must be finite and >= 0 (0: no bound, only a NaN/Inf '
          'loss counts as a blow-up); set it well above the losses of a healthy run')
  c.check(trainer.recovery_max_trials >= 0, 'trainer_options.recovery_max_trials',
          f'{trainer.recovery_max_trials} must be >= 0 (0: no recovery, a blow-up stops '
          'training)')
  c.check(solver.optimizer in OPTIMIZERS, 'trainer_options.solver_options.optimizer',
          f'"{solver.optimizer}" is unknown; use one of {", ".join(OPTIMIZERS)}')
  c.check(solver.learning_policy in LEARNING_POLICIES,
          'trainer_options.solver_options.learning_policy',
          f'"{solver.learning_policy}" is unknown; use one of {", ".join(LEARNING_POLICIES)}')
  c.check(solver.base_learning_rate > 0, 'trainer_options.solver_options.base_learning_rate',
          f'{solver.base_learning_rate:g} must be positive')
  c.check(solver.training_number_of_steps > 0,
          'trainer_options.solver_options.training_number_of_steps', 'must be positive')
  c.check(0 <= solver.warmup_steps <= solver.training_number_of_steps,
          'trainer_options.solver_options.warmup_steps',
          f'{solver.warmup_steps} must be in [0, training_number_of_steps = '
          f'{solver.training_number_of_steps}]')
  c.check(solver.adamw_weight_decay >= 0, 'trainer_options.solver_options.adamw_weight_decay',
          'must be >= 0')
  c.check(solver.backbone_learning_rate_multiplier >= 0,
          'trainer_options.solver_options.backbone_learning_rate_multiplier', 'must be >= 0')
  c.check(solver.clip_gradient_norm > 0, 'trainer_options.solver_options.clip_gradient_norm',
          'must be positive')
  c.check(_in_unit_interval(solver.batchnorm_momentum),
          'trainer_options.solver_options.batchnorm_momentum', 'is not in [0, 1]')
  c.check(solver.batchnorm_epsilon > 0, 'trainer_options.solver_options.batchnorm_epsilon',
          'must be positive')
  losses = trainer.loss_options
  for loss_field, _ in losses.ListFields():
    loss = getattr(losses, loss_field.name)
    c.check(loss.weight >= 0 and math.isfinite(loss.weight),
            f'trainer_options.loss_options.{loss_field.name}.weight', 'must be finite and >= 0')
    c.check(_in_unit_interval(loss.top_k_percent, low_open=True),
            f'trainer_options.loss_options.{loss_field.name}.top_k_percent',
            f'{loss.top_k_percent:g} is not in (0, 1]')


def _check_evaluator(c: _Checker, evaluator):
  field = 'evaluator_options'
  c.check(evaluator.transformer_post_processing in (common.POST_PROCESSING_PIXELWISE,
                                                    common.POST_PROCESSING_MASKWISE),
          f'{field}.transformer_post_processing',
          f'"{evaluator.transformer_post_processing}" is unknown; use pixelwise or maskwise')
  for name in ('transformer_class_confidence_threshold', 'pixel_confidence_threshold'):
    value = getattr(evaluator, name)
    c.check(_in_unit_interval(value), f'{field}.{name}', f'{value:g} is not in [0, 1]')
  mask = evaluator.maskwise_postprocessing
  for name in ('transformer_class_confidence_threshold_thing',
               'transformer_class_confidence_threshold_stuff', 'overlapping_threshold'):
    value = getattr(mask, name)
    c.check(_in_unit_interval(value), f'{field}.maskwise_postprocessing.{name}',
            f'{value:g} is not in [0, 1]')
  for name in ('reorder_class_weight', 'reorder_mask_weight'):
    c.check(getattr(mask, name) >= 0, f'{field}.maskwise_postprocessing.{name}',
            'must be >= 0')
  for name in ('stuff_area_limit', 'thing_area_limit'):
    c.check(getattr(evaluator, name) >= 0, f'{field}.{name}', 'must be >= 0')
  c.check(evaluator.raw_panoptic_format in RAW_PANOPTIC_FORMATS, f'{field}.raw_panoptic_format',
          f'"{evaluator.raw_panoptic_format}" is unknown; use one of '
          f'{", ".join(RAW_PANOPTIC_FORMATS)}')
  c.check(evaluator.eval_steps == -1 or evaluator.eval_steps > 0, f'{field}.eval_steps',
          'must be positive, or -1 for the whole split')
  c.check(evaluator.eval_interval > 0, f'{field}.eval_interval', 'must be positive')


def find_problems(config: config_pb2.ExperimentOptions, num_replicas: int = 1) -> list[Problem]:
  """All semantic problems of `config` (empty when it is valid)."""
  c = _Checker()
  descriptor = None
  if config.HasField('train_dataset_options'):
    descriptor = _check_dataset(c, config.train_dataset_options, 'train_dataset_options',
                                num_replicas, required_crop=True)
  if config.HasField('eval_dataset_options'):
    eval_descriptor = _check_dataset(c, config.eval_dataset_options, 'eval_dataset_options',
                                     num_replicas, required_crop=False)
    if descriptor is not None and eval_descriptor is not None:
      for name in ('num_classes', 'ignore_label', 'panoptic_label_divisor'):
        train_value, eval_value = getattr(descriptor, name), getattr(eval_descriptor, name)
        c.check(train_value == eval_value, 'eval_dataset_options',
                f'{name} of the eval dataset ({eval_value}) differs from the train dataset '
                f'({train_value}); both must describe the same label space')
    descriptor = descriptor or eval_descriptor
  c.check(descriptor is not None or c.problems, 'train_dataset_options',
          'no dataset options; give train_dataset_options and/or eval_dataset_options')
  _check_model(c, config, descriptor)
  _check_trainer(c, config.trainer_options)
  if config.trainer_options.recompute:
    meta_name = config.model_options.WhichOneof('meta_architecture')
    c.check(meta_name in (common.META_KMAX, common.META_CMT), 'trainer_options.recompute',
            f'{list(config.trainer_options.recompute)} is set but {meta_name} cannot recompute '
            'activations (kmax and cmt can); remove trainer_options.recompute')
  if config.trainer_options.loss_options.HasField('reference_mask_loss'):
    meta_name = config.model_options.WhichOneof('meta_architecture')
    c.check(meta_name == common.META_CMT and config.model_options.cmt.use_reference_masks,
            'trainer_options.loss_options.reference_mask_loss',
            f'is set but the model ({meta_name}) predicts no reference masks; it needs '
            'model_options.cmt with use_reference_masks: true, or remove the loss')
  _check_evaluator(c, config.evaluator_options)
  for value in config.export_options.input_type:
    c.check(value in EXPORT_INPUT_TYPES, 'export_options.input_type',
            f'"{value}" is unknown; use one of {", ".join(EXPORT_INPUT_TYPES)}')
  c.check(config.export_options.batch_size >= 0, 'export_options.batch_size',
          'must be >= 0 (0 = dynamic)')
  return c.problems
