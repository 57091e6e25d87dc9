"""Builds a Keras 3 model from an ExperimentOptions proto (the only module reading protos).

    model = build_model(experiment_options)            # built on the train crop
    outputs = model(images, training=False)            # dict with DeepLab2's output keys

Sub-networks (`model.encoder`, `model.pixel_decoder`, ...) take plain arguments and can be
built separately with `build_encoder(...)` etc.
"""

import keras
import numpy as np

from deeplab2_kmax import common
from deeplab2_kmax.data import datasets
from deeplab2_kmax.model import kmax_deeplab
from deeplab2_kmax.model import max_deeplab
from deeplab2_kmax.model.heads import conv_head
from deeplab2_kmax.model.heads import max_head
from deeplab2_kmax.model.heads import semantic
from deeplab2_kmax.model.layers import xla_elementwise
from deeplab2_kmax.model.layers import normalization
from deeplab2_kmax.model.pixel_decoder import kmax as kmax_pixel_decoder
from deeplab2_kmax.model.pixel_encoder import convnext
from deeplab2_kmax.model.pixel_encoder import dual_path_resnet
from deeplab2_kmax.model.pixel_encoder import resnet
from deeplab2_kmax.model.transformer_decoder import cmt as cmt_transformer_decoder
from deeplab2_kmax.model.transformer_decoder import kmax as kmax_transformer_decoder

# kMaX uses GELU in every decoder and head.
ACTIVATION = 'gelu'
DEFAULT_TRANSFORMER_NUM_BLOCKS = (2, 2, 2)
DEFAULT_TRANSFORMER_STRIDES = (32, 16, 8)

# The table of what build_model can build; config/validation.py checks configs against it.
# Pixel encoders of kmax { } and cmt { }: ResNet-50 variants ({name: ResNet backbone_type})
# and ConvNeXt sizes.
RESNET_ENCODERS = {'resnet50': 'resnet', 'axial_resnet50': 'axial_resnet'}
CONVNEXT_ENCODERS = ('convnext_tiny', 'convnext_small', 'convnext_base', 'convnext_large')
KMAX_ENCODERS = tuple(RESNET_ENCODERS) + CONVNEXT_ENCODERS
# The dual-path networks of max_deeplab { } (kmax and cmt cannot use them).
DUAL_PATH_ENCODERS = tuple(dual_path_resnet.PRESETS)
ENCODERS = KMAX_ENCODERS + DUAL_PATH_ENCODERS
# Block types of the kMaX pixel decoder's stages (model_options.<meta>.pixel_decoder.block_types).
PIXEL_DECODER_BLOCK_TYPES = ('axial', 'bottleneck')
# The crop build_model builds on when neither dataset gives one (variable shapes do not depend
# on it; DeepLab2's COCO crop).
FALLBACK_BUILD_CROP = (641, 641)


def backbone_name(name: str) -> str:
  """Our encoder name for model_options.backbone.name: DeepLab2 names kMaX encoders
  "kmax_<name>", and we accept that prefix."""
  return name[len('kmax_'):] if name.startswith('kmax_') else name


def norm_layer_from_solver(solver_options):
  return normalization.make_norm_layer(momentum=solver_options.batchnorm_momentum,
                                       epsilon=solver_options.batchnorm_epsilon,
                                       synchronized=solver_options.use_sync_batchnorm)


def build_encoder(backbone_options, norm_layer, dtype=None):
  """The pixel encoder named by backbone_options.name (DeepLab2's 'kmax_' prefix allowed)."""
  name = backbone_name(backbone_options.name)
  # DeepLab2's kMaX encoders always use the linear stochastic-depth schedule.
  schedule = (backbone_options.drop_path_schedule
              if backbone_options.HasField('drop_path_schedule') else 'linear')
  if name in RESNET_ENCODERS:
    return resnet.ResNet(
        backbone_type=RESNET_ENCODERS[name],
        width_multiplier=backbone_options.backbone_width_multiplier,
        stem_width_multiplier=backbone_options.stem_width_multiplier,
        layer_multiplier=backbone_options.backbone_layer_multiplier,
        drop_path_keep_prob=backbone_options.drop_path_keep_prob,
        drop_path_schedule=schedule, norm_layer=norm_layer, name='encoder', dtype=dtype)
  if name in CONVNEXT_ENCODERS:
    return convnext.ConvNeXt(
        size=name[len('convnext_'):], drop_path_keep_prob=backbone_options.drop_path_keep_prob,
        width_multiplier=backbone_options.backbone_width_multiplier,
        layer_multiplier=backbone_options.backbone_layer_multiplier, name='encoder',
        dtype=dtype)
  raise ValueError(f'model_options.backbone.name is "{backbone_options.name}", which is no '
                   f'kMaX pixel encoder; use one of {", ".join(KMAX_ENCODERS)}.')


# MaX-DeepLab's default number of memory rows (DeepLab2's max_num_mask_slots).
DEFAULT_MAX_NUM_MASK_SLOTS = 128


def dual_path_arguments(model_options):
  """DualPathResNet kwargs: the backbone's preset, overridden by the set DualPathOptions."""
  name = backbone_name(model_options.backbone.name)
  if name not in dual_path_resnet.PRESETS:
    raise ValueError(f'model_options.backbone.name is "{model_options.backbone.name}"; '
                     f'max_deeplab {{ }} needs one of {sorted(dual_path_resnet.PRESETS)}.')
  options = model_options.max_deeplab
  arguments = dict(dual_path_resnet.PRESETS[name])
  for field in options.dual_path.DESCRIPTOR.fields:
    if field.is_repeated:
      if getattr(options.dual_path, field.name):
        arguments[field.name] = list(getattr(options.dual_path, field.name))
    elif options.dual_path.HasField(field.name):
      arguments[field.name] = getattr(options.dual_path, field.name)
  max_slots = (options.max_num_mask_slots if options.HasField('max_num_mask_slots')
               else max(DEFAULT_MAX_NUM_MASK_SLOTS, options.num_mask_slots))
  backbone = model_options.backbone
  arguments.update(
      num_mask_slots=options.num_mask_slots, max_num_mask_slots=max_slots,
      output_stride=backbone.output_stride,
      backbone_layer_multiplier=backbone.backbone_layer_multiplier,
      width_multiplier=backbone.backbone_width_multiplier,
      stem_width_multiplier=backbone.stem_width_multiplier,
      drop_path_keep_prob=backbone.drop_path_keep_prob,
      drop_path_schedule=backbone.drop_path_schedule)
  return arguments


def build_pixel_decoder(kmax_options, norm_layer, dtype=None):
  decoder_options = kmax_options.pixel_decoder
  dims, num_blocks, block_types = kmax_pixel_decoder.default_options(
      kmax_options.high_resolution_output_stride)
  if decoder_options.dims:
    dims = list(decoder_options.dims)
  if decoder_options.num_blocks:
    num_blocks = list(decoder_options.num_blocks)
  if decoder_options.block_types:
    block_types = list(decoder_options.block_types)
  return kmax_pixel_decoder.KMaXPixelDecoder(
      dims, num_blocks, block_types, drop_path_keep_prob=decoder_options.drop_path_keep_prob,
      activation=ACTIVATION, norm_layer=norm_layer, name='pixel_decoder', dtype=dtype)


def _max_head_args(meta_options, num_classes):
  return dict(pixel_head_channels=meta_options.pixel_space_head.head_channels,
              embedding_channels=meta_options.pixel_space_head.output_channels,
              num_classes=num_classes,
              head_conv_type=meta_options.pixel_space_head.head_conv_type)


def build_transformer_decoder(kmax_options, num_classes, norm_layer, dtype=None):
  """kMaX's decoder for KMaXDeepLabOptions, CMT's for CMTDeepLabOptions (same shared fields)."""
  options = kmax_options.transformer_decoder
  decoder_class = kmax_transformer_decoder.KMaXTransformerDecoder
  cmt_args = {}
  if kmax_options.DESCRIPTOR.name == 'CMTDeepLabOptions':
    decoder_class = cmt_transformer_decoder.CMTTransformerDecoder
    cmt_args = dict(use_coordinate_features=kmax_options.use_coordinate_features,
                    update_pixel_features=kmax_options.update_pixel_features,
                    use_reference_masks=kmax_options.use_reference_masks,
                    stop_gradient_assignment=kmax_options.stop_gradient_assignment)
  return decoder_class(
      num_cluster_centers=kmax_options.num_cluster_centers,
      num_blocks=list(options.num_blocks) or list(DEFAULT_TRANSFORMER_NUM_BLOCKS),
      strides=list(options.strides) or list(DEFAULT_TRANSFORMER_STRIDES),
      channels=options.channels, num_heads=options.num_heads,
      key_channels=options.key_channels, value_channels=options.value_channels,
      ffn_channels=options.ffn_channels,
      drop_path_keep_prob=kmax_options.transformer_decoder_drop_path_keep_prob,
      auxiliary_head_args=_max_head_args(kmax_options, num_classes), activation=ACTIVATION,
      norm_layer=norm_layer, name='transformer_decoder', dtype=dtype, **cmt_args)


def dataset_descriptor(experiment_options):
  for options in (experiment_options.train_dataset_options,
                  experiment_options.eval_dataset_options):
    if options.WhichOneof('dataset_source') is not None:
      return datasets.from_dataset_options(options)
  raise ValueError('The experiment names no dataset; the class head needs one.')


def default_crop(experiment_options) -> tuple[int, int]:
  """(height, width) of the train crop, else of the eval crop, else FALLBACK_BUILD_CROP."""
  for name in ('train_dataset_options', 'eval_dataset_options'):
    crop_size = getattr(experiment_options, name).crop_size
    if crop_size:
      return datasets.crop_size_of(crop_size, f'{name}.crop_size')
  return FALLBACK_BUILD_CROP


def _semantic_branch(model_options, meta_options, semantic_channels, use_decoder, activation,
                     norm_layer, policy):
  """(semantic decoder or None, semantic head) of the auxiliary semantic branch."""
  head = meta_options.auxiliary_semantic_head
  semantic_head = conv_head.ConvHead(head.head_channels, semantic_channels,
                                     conv_type=head.head_conv_type, activation=activation,
                                     norm_layer=norm_layer, name='semantic_head', dtype=policy)
  if not use_decoder:
    return None, semantic_head
  decoder = model_options.decoder
  semantic_decoder = semantic.SemanticDecoder(
      high_level_feature_key=decoder.feature_key,
      low_level_feature_keys=[x.feature_key for x in meta_options.auxiliary_low_level],
      low_level_channels_project=[x.channels_project for x in meta_options.auxiliary_low_level],
      aspp_channels=decoder.aspp_channels,
      atrous_rates=list(decoder.atrous_rates) or [6, 12, 18],
      aspp_use_only_1x1_proj_conv=decoder.aspp_use_only_1x1_proj_conv,
      decoder_channels=decoder.decoder_channels,
      decoder_conv_type=decoder.decoder_conv_type, activation=activation,
      norm_layer=norm_layer, name='semantic_decoder', dtype=policy)
  return semantic_decoder, semantic_head


def build_model(experiment_options, crop_size=None, descriptor=None, dtype=None, build=True):
  """Returns a built model for the experiment's `kmax`, `cmt` or `max_deeplab` meta-architecture.

  CMT-DeepLab is kMaX's meta-architecture with the CMT transformer decoder (the model is named
  `cmt_deeplab`); MaX-DeepLab (`max_deeplab`) is the dual-path network with the MaX head. All
  give the same output keys (MaX-DeepLab without auxiliary outputs).

  Args:
    experiment_options: config_pb2.ExperimentOptions.
    crop_size: (height, width) to build on; defaults to the train (else eval) crop.
    descriptor: DatasetDescriptor; defaults to the experiment's dataset.
    dtype: Keras dtype policy name; defaults to trainer_options.mixed_precision_policy.
    build: Run one eager forward pass on zeros so every variable exists (required before
      tf.function, load_weights or checkpoint restore).
  """
  model_options = experiment_options.model_options
  meta = model_options.WhichOneof('meta_architecture')
  if meta not in (common.META_KMAX, common.META_CMT, common.META_MAX_DEEPLAB):
    raise ValueError('model_options needs one of kmax { }, cmt { } or max_deeplab { }; '
                     f'it has "{meta}".')
  meta_options = getattr(model_options, meta)
  descriptor = descriptor or dataset_descriptor(experiment_options)
  if dtype is None:
    dtype = experiment_options.trainer_options.mixed_precision_policy or 'float32'
  policy = keras.dtype_policies.get(dtype)
  norm_layer = norm_layer_from_solver(experiment_options.trainer_options.solver_options)

  semantic_channels = (meta_options.auxiliary_semantic_head.output_channels
                       or descriptor.num_classes)
  num_classes = max_head.transformer_class_head_num_classes(semantic_channels,
                                                            descriptor.ignore_label)
  if meta == common.META_MAX_DEEPLAB:
    arguments = dual_path_arguments(model_options)
    activation = arguments['activation']
    encoder = dual_path_resnet.DualPathResNet(norm_layer=norm_layer, name='encoder',
                                              dtype=policy, **arguments)
    use_decoder = True
  else:
    activation = ACTIVATION
    encoder = build_encoder(model_options.backbone, norm_layer, dtype=policy)
    pixel_decoder = build_pixel_decoder(meta_options, norm_layer, dtype=policy)
    transformer_decoder = build_transformer_decoder(meta_options, num_classes, norm_layer,
                                                    dtype=policy)
    use_decoder = meta_options.use_auxiliary_semantic_decoder
  predictor = max_head.MaXHead(activation=activation, norm_layer=norm_layer, name='predictor',
                               dtype=policy, **_max_head_args(meta_options, num_classes))
  semantic_decoder = semantic_head = None
  if meta_options.use_auxiliary_semantic_head:
    semantic_decoder, semantic_head = _semantic_branch(
        model_options, meta_options, semantic_channels, use_decoder, activation, norm_layer,
        policy)
  if meta == common.META_MAX_DEEPLAB:
    model = max_deeplab.MaXDeepLab(encoder, predictor, semantic_decoder, semantic_head,
                                   name=f'{meta}', dtype=policy)
  else:
    model = kmax_deeplab.KMaXDeepLab(encoder, pixel_decoder, transformer_decoder, predictor,
                                     semantic_decoder, semantic_head, name=f'{meta}_deeplab',
                                     dtype=policy)
  if build:
    height, width = crop_size or default_crop(experiment_options)
    # Plain ops for this throw-away call: the eager inference fusion would compile an XLA
    # function per map shape (and TF warn about the retracing) only to build the variables.
    with xla_elementwise.disabled():
      model(np.zeros([1, height, width, 3], np.float32), training=False)
  if experiment_options.trainer_options.recompute:
    # Training-mode calls only; applies once the sub-networks are built (the build above).
    model.set_recompute(experiment_options.trainer_options.recompute)
  return model
