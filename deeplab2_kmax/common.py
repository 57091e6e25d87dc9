"""String keys shared by data, model, loss, evaluation and export.

Every dictionary key that crosses a module boundary is defined here once (and pinned by
tests/test_common.py), so a rename is a reviewed change. Values equal DeepLab2's where the
concept is the same, so DeepLab2 TFRecords and habits carry over.
"""

# ---- TFRecord feature keys (DeepLab2's data format, reference §6.2) ----
KEY_ENCODED_IMAGE = 'image/encoded'
KEY_IMAGE_FILENAME = 'image/filename'
KEY_IMAGE_FORMAT = 'image/format'
KEY_IMAGE_HEIGHT = 'image/height'
KEY_IMAGE_WIDTH = 'image/width'
KEY_IMAGE_CHANNELS = 'image/channels'
KEY_ENCODED_LABEL = 'image/segmentation/class/encoded'
KEY_LABEL_FORMAT = 'image/segmentation/class/format'

# ---- Decoded example keys (output of data/formats/tfrecord.py) ----
IMAGE = 'image'
LABEL = 'label'
IMAGE_NAME = 'image_name'
HEIGHT = 'height'
WIDTH = 'width'

# ---- Training / eval sample keys (output of data/input/sample_generator.py) ----
GT_PANOPTIC = 'panoptic_gt'
GT_SEMANTIC = 'semantic_gt'
GT_IS_CROWD = 'is_crowd_gt'
GT_THING_ID_MASK = 'thing_id_mask_gt'
GT_THING_ID_CLASS = 'thing_id_class_gt'
SEMANTIC_LOSS_WEIGHT = 'semantic_loss_weight'
RESIZED_IMAGE = 'resized_image'
# int32 [2]: image size after resize-to-range, before padding to the crop (eval only).
RESIZED_SIZE = 'resized_size'
GT_SIZE_RAW = 'size_raw'
GT_PANOPTIC_RAW = 'panoptic_raw'
GT_SEMANTIC_RAW = 'semantic_raw'
GT_IS_CROWD_RAW = 'is_crowd_raw'

# ---- Model outputs ----
PRED_PANOPTIC = 'panoptic_pred'
PRED_SEMANTIC = 'semantic_pred'
PRED_INSTANCE = 'instance_pred'
PRED_INSTANCE_SCORES = 'instance_scores'
PRED_SEMANTIC_SCORES = 'semantic_scores'
PRED_SEMANTIC_LOGITS = 'semantic_logits'
PRED_PIXEL_SPACE_NORMALIZED_FEATURE = 'pixel_space_normalized_feature'
PRED_PIXEL_SPACE_MASK_LOGITS = 'pixel_space_mask_logits'
PRED_TRANSFORMER_CLASS_LOGITS = 'transformer_class_logits'
PRED_AUXILIARY_OUTPUTS = 'auxiliary_outputs_pred'
# Exported signatures' extra outputs (deeplab2_kmax/export/serving_module.py): int32 [batch, 2]
# size of each input image, int32 [batch] segment count, and per-segment arrays
# [batch, num slots].
PRED_IMAGE_SIZE = 'image_size'
PRED_NUM_SEGMENTS = 'num_segments'
PRED_SEGMENT_IDS = 'segment_ids'
PRED_SEGMENT_CLASSES = 'segment_classes'
PRED_SEGMENT_SCORES = 'segment_scores'
PRED_SEGMENT_AREAS = 'segment_areas'
# CMT-DeepLab: log of each center's reference mask, float32 [batch, h, w, N] (auxiliary outputs).
PRED_REFERENCE_MASK_LOGITS = 'reference_mask_logits'

# ---- Loss names ----
SEMANTIC_LOSS = 'semantic_loss'
PQ_STYLE_LOSS = 'pq_style_loss'
PQ_STYLE_LOSS_CLASS_TERM = 'pq_style_loss_class_term'
PQ_STYLE_LOSS_MASK_DICE_TERM = 'pq_style_loss_mask_dice_term'
MASK_ID_CROSS_ENTROPY_LOSS = 'mask_id_cross_entropy_loss'
INSTANCE_DISCRIMINATION_LOSS = 'instance_discrimination_loss'
REFERENCE_MASK_LOSS = 'reference_mask_loss'
TOTAL_LOSS = 'total_loss'

# ---- Meta-architectures (members of ModelOptions.meta_architecture) ----
META_KMAX = 'kmax'
META_CMT = 'cmt'
META_MAX_DEEPLAB = 'max_deeplab'

# ---- Post-processing modes ----
POST_PROCESSING_PIXELWISE = 'pixelwise'
POST_PROCESSING_MASKWISE = 'maskwise'

# ---- Checkpoint item names ----
CKPT_ENCODER = 'encoder'
CKPT_PIXEL_DECODER = 'pixel_decoder'
CKPT_TRANSFORMER_DECODER = 'transformer_decoder'
CKPT_SEMANTIC_DECODER = 'semantic_decoder'
CKPT_SEMANTIC_LAST_LAYER = 'semantic_last_layer'
CKPT_TRANSFORMER_CLASS_HEAD = 'transformer_class_head'

# ---- Environment variables ----
ENV_SYNTHETIC_DATA_DIR = 'SYNTHETIC_DATA_DIR'
ENV_CACHE_DIR = 'DEEPLAB2_KMAX_CACHE'

# ---- Evaluation ----
# Keys of the panoptic-quality results (the JSON written by evaluation.coco_panoptic).
PQ_ALL = 'All'
PQ_THINGS = 'Things'
PQ_STUFF = 'Stuff'
PER_CLASS = 'per_class'  # per-category values of PQ and mIoU results
MIOU = 'miou'
PQ = 'pq'
SQ = 'sq'
RQ = 'rq'
PQ_NUM_CATEGORIES = 'n'

# ---- Loss and post-processing ----
# Auxiliary-output loss names are AUXILIARY_LOSS_PREFIX + str(i) + term, e.g.
# 'aux_0pq_style_loss_class_term' (DeepLab2's spelling).
AUXILIARY_LOSS_PREFIX = 'aux_'
# float32 [batch]: how many loss terms of each example were NaN/Inf and replaced by 0.
NON_FINITE_LOSS_COUNT = 'non_finite_loss_count'

# ---- Model endpoints ----
# Keys of the endpoint dicts passed between the pixel encoder, pixel decoder, transformer
# decoder and heads (DeepLab2's names). Encoder endpoints are 'stage1'..'stage5' (non-activated)
# and 'res1'..'res5' (activated); pixel-decoder stages add decoder_stage_endpoint(stride).
ENDPOINT_DECODER_OUTPUT = 'decoder_output'
ENDPOINT_FEATURE_PANOPTIC = 'feature_panoptic'
ENDPOINT_FEATURE_SEMANTIC = 'feature_semantic'
ENDPOINT_TRANSFORMER_CLASS_FEATURE = 'transformer_class_feature'
ENDPOINT_TRANSFORMER_MASK_FEATURE = 'transformer_mask_feature'

# The largest stride of every encoder (its last stage), where the pixel decoder starts: crops
# are k * 32 + 1 so that every stride halves the size exactly.
ENCODER_OUTPUT_STRIDE = 32


def decoder_stage_endpoint(stride: int) -> str:
  """The endpoint key of the pixel-decoder stage at `stride`: 'decoder_stage1' at stride 32,
  'decoder_stage2' at 16, 'decoder_stage3' at 8, ... (DeepLab2's names).

  Raises:
    ValueError: naming the stride, unless it is ENCODER_OUTPUT_STRIDE / 2^k.
  """
  if not (0 < stride <= ENCODER_OUTPUT_STRIDE and ENCODER_OUTPUT_STRIDE % stride == 0
          and stride & (stride - 1) == 0):
    raise ValueError(f'stride {stride} is no pixel-decoder stride; the stages are at '
                     f'{ENCODER_OUTPUT_STRIDE}, {ENCODER_OUTPUT_STRIDE // 2}, ... (powers of two)')
  return f'decoder_stage{(ENCODER_OUTPUT_STRIDE // stride).bit_length()}'
