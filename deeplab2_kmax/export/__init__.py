"""Exports a trained model for serving: a SavedModel (TF Serving, TF's C API), ONNX (ONNX
Runtime and the execution providers behind it) and LiteRT (phones), each with the pre- and
post-processing in the graph.

    python -m deeplab2_kmax.export --config_file=F (--checkpoint_path=C | --model_dir=D) \
        --output_path=O [--format=saved_model,onnx,litert] [--precision=float32|bfloat16|auto] \
        [--input_type=image_tensor,image_bytes,tf_example] [--batch_size=N|dynamic] \
        [--version=V] [--litert_weights=float32|float16] [--onnx_opset=17]

writes into `O/<version>/` (TF Serving's versioned layout):

| format      | file(s)                              | run it with                           |
|-------------|--------------------------------------|---------------------------------------|
| saved_model | saved_model.pb, variables/           | TF Serving, tf.saved_model.load       |
| onnx        | model.onnx                           | onnxruntime.InferenceSession          |
| litert      | model.tflite                         | ai_edge_litert.interpreter            |

plus `assets.extra/dataset_descriptor.textproto` (the label space) and, with the SavedModel,
`assets.extra/tf_serving_warmup_requests`: TF Serving's warm-up file (TFRecord of PredictionLog
records, two PredictRequests per signature at the export's batch size, deterministic gradient
images; serving_warmup.py), which TF Serving runs at load time so the first request is fast.
deeplab2_kmax.predict --model= runs any of them (export/runtimes.py). The SavedModel has the
tag `serve` and these signatures (ONNX and LiteRT have serving_default only):

| signature       | input                                           | name          |
|-----------------|-------------------------------------------------|---------------|
| serving_default | uint8 [batch, height, width, 3] (any h, w > 0)  | `images`      |
| image_bytes     | string [batch], JPEG or PNG bytes (any sizes)   | `image_bytes` |
| tf_example      | string [batch], serialized tf.Example with      | `examples`    |
|                 | DeepLab2's keys (image/encoded, ...)            |               |

Each image goes through the evaluation preprocessing (resize to range, pad bottom/right to the
eval crop), the model and the post-processor; the predictions are cropped back and resized to
the image's own size. Outputs, for a batch whose largest image is H x W (smaller images are
padded: void label, instance 0, score 0):

| output           | dtype / shape                 | meaning                                  |
|------------------|-------------------------------|------------------------------------------|
| panoptic_pred    | int32 [batch, H, W]           | semantic * label_divisor + instance      |
| semantic_pred    | int32 [batch, H, W]           | class of each pixel's best mask          |
| instance_pred    | int32 [batch, H, W]           | mask slot + 1 of kept pixels, 0 elsewhere |
| instance_scores  | float32 [batch, H, W]         | confidence of each pixel's instance      |
| semantic_scores  | float32 [batch, H, W]         | confidence of each pixel's class         |
| image_size       | int32 [batch, 2]              | (height, width) of each image            |
| num_segments     | int32 [batch]                 | segments (non-void panoptic ids) found   |
| segment_ids      | int32 [batch, S]              | panoptic id of each segment, ascending;  |
|                  |                               | -1 padding (S = the model's mask slots)  |
| segment_classes  | int32 [batch, S]              | class of each segment; -1 padding        |
| segment_scores   | float32 [batch, S]            | mean instance score over its pixels      |
| segment_areas    | int32 [batch, S]              | pixels of each segment; 0 padding        |

`assets.extra/dataset_descriptor.textproto` holds the label space (class names, colours,
label divisor) for clients.

With export_options.include_raw_outputs the model's raw outputs at the eval crop are added
(`pixel_space_mask_logits`, `transformer_class_logits`, `semantic_logits`, ...).

Bad inputs (a zero-size image, empty or undecodable bytes) fail the request with an
InvalidArgumentError naming the problem; a wrong dtype or rank is refused by the signature.
`build_serving_module` only needs a Keras model returning `pixel_space_mask_logits` and
`transformer_class_logits` and a post-processor, so every meta-architecture exports this way.

Modules: serving_module (the graph), saved_model, onnx_format, litert_format (the writers),
serving_warmup (TF Serving's warm-up requests), runtimes (loading any format), cli (the command
line).
"""

# The library's entry points, so that `from deeplab2_kmax import export` reads as before.
from deeplab2_kmax.export.saved_model import ASSETS_EXTRA
from deeplab2_kmax.export.saved_model import descriptor_path
from deeplab2_kmax.export.saved_model import latest_version_dir
from deeplab2_kmax.export.saved_model import load_descriptor
from deeplab2_kmax.export.saved_model import TAG_SERVE
from deeplab2_kmax.export.saved_model import write as export
from deeplab2_kmax.export.serving_module import IMAGE_SIZE
from deeplab2_kmax.export.serving_module import INPUT_NAMES
from deeplab2_kmax.export.serving_module import INPUT_TYPES
from deeplab2_kmax.export.serving_module import NUM_SEGMENTS
from deeplab2_kmax.export.serving_module import PREDICTION_KEYS
from deeplab2_kmax.export.serving_module import RAW_OUTPUT_KEYS
from deeplab2_kmax.export.serving_module import SEGMENT_AREAS
from deeplab2_kmax.export.serving_module import SEGMENT_CLASSES
from deeplab2_kmax.export.serving_module import SEGMENT_IDS
from deeplab2_kmax.export.serving_module import SEGMENT_KEYS
from deeplab2_kmax.export.serving_module import SEGMENT_SCORES
from deeplab2_kmax.export.serving_module import SIGNATURE_IMAGE_BYTES
from deeplab2_kmax.export.serving_module import SIGNATURE_IMAGE_TENSOR
from deeplab2_kmax.export.serving_module import SIGNATURE_TF_EXAMPLE
from deeplab2_kmax.export.serving_module import PreprocessOptions
from deeplab2_kmax.export.serving_module import segments_of
from deeplab2_kmax.export.serving_module import build_serving_module
from deeplab2_kmax.export.serving_module import preprocess_batch
from deeplab2_kmax.export.serving_module import restore_model
from deeplab2_kmax.export.serving_module import ServingModule
from deeplab2_kmax.export.cli import parse_batch_size

