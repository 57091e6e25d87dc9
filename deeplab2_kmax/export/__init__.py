"""Exports a trained model for serving: a SavedModel (TF Serving, TF's C API), ONNX (ONNX
Runtime and the execution providers behind it) and LiteRT (phones), each with the pre- and
post-processing in the graph.

    python -m deeplab2_kmax.export --config_file=F (--checkpoint_path=C | --model_dir=D) \
        --output_path=O [--format=saved_model,onnx,litert] [--precision=float32|bfloat16|auto] \
        [--input_type=image_tensor,image_bytes,tf_example] [--batch_size=N|dynamic] \
        [--version=V [--overwrite]] [--litert_weights=float32|float16] [--onnx_opset=17]

writes into `O/<version>/` (TF Serving's versioned layout; by default the next free version,
so an export never replaces one; an explicit version that is taken needs --overwrite). C is a
ckpt-N prefix, a folder of checkpoints or a model-zoo name (checkpoint/paths.resolve_checkpoint).

| format      | file(s)                              | run it with                           |
|-------------|--------------------------------------|---------------------------------------|
| saved_model | saved_model.pb, variables/           | TF Serving, tf.saved_model.load       |
| onnx        | model.onnx                           | onnxruntime.InferenceSession          |
| litert      | model.tflite                         | ai_edge_litert.interpreter            |

plus `assets.extra/dataset_descriptor.textproto` (the label space), `experiment.textproto` and
`command_line.txt` (the effective config and the command that wrote the version) and, with the
SavedModel, `assets.extra/tf_serving_warmup_requests`: TF Serving's warm-up file (TFRecord of
PredictionLog records, two PredictRequests per signature at the export's batch size,
deterministic gradient images; serving_warmup.py), which TF Serving runs at load time so the
first request is fast.
deeplab2_kmax.predict --model= runs any of them (export/runtimes.py).

The SavedModel has the tag `serve` and the signatures serving_default (uint8 images),
image_bytes and tf_example; ONNX and LiteRT have serving_default only. The inputs, the outputs
(panoptic, semantic and instance maps at each image's size, scores, per-segment arrays) and the
handling of bad inputs are tabled in serving_module.py's docstring.

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
from deeplab2_kmax.export.serving_module import error_message
from deeplab2_kmax.export.serving_module import parse_batch_size
from deeplab2_kmax.export.serving_module import ServingModule

