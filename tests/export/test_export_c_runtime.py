"""The exported SavedModel in TensorFlow's C runtime, without Python (issue #7, 3 and 5).

The test writes a small C program, compiles it against the C API headers and the
libtensorflow_cc.so.2 / libtensorflow_framework.so.2 of the installed TensorFlow wheel, and runs
it: TF_LoadSessionFromSavedModel with the tag `serve` (the C++ SavedModel loader TF Serving
uses), then TF_SessionRun of serving_default. Its outputs must equal Python's; bad inputs must
come back as a non-OK TF_Status with a message, not a crash. Tensor names come from the
SavedModel's signature_def, as a serving system reads them.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest
import tensorflow as tf

from tests.export.conftest import sample_images

C_SOURCE = r'''
/* run_saved_model EXPORT_DIR INPUT_NAME MANIFEST OUTPUT...
   Loads the SavedModel once, then for each MANIFEST line "DTYPE B H W INPUT_FILE OUT_DIR"
   (DTYPE uint8 or float) feeds the [B, H, W, 3] tensor read from INPUT_FILE to INPUT_NAME
   ("op:index"), fetches the OUTPUT tensors and writes each to OUT_DIR/<k>.bin as: int32 dtype,
   int32 rank, int64 dims[rank], data. OUT_DIR/status.txt gets the TF_Code and message. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "tensorflow/c/c_api.h"

static void free_buffer(void *data, size_t length, void *arg) { free(data); }

static TF_Output output_of(TF_Graph *graph, const char *spec) {
  char name[512];
  const char *colon = strrchr(spec, ':');
  size_t length = colon ? (size_t)(colon - spec) : strlen(spec);
  TF_Output result = {NULL, 0};
  if (length >= sizeof(name)) return result;
  memcpy(name, spec, length);
  name[length] = 0;
  result.oper = TF_GraphOperationByName(graph, name);
  result.index = colon ? atoi(colon + 1) : 0;
  return result;
}

static void write_status(const char *out_dir, TF_Status *status) {
  char path[4096];
  snprintf(path, sizeof(path), "%s/status.txt", out_dir);
  FILE *file = fopen(path, "w");
  fprintf(file, "%d\n%s\n", (int)TF_GetCode(status), TF_Message(status));
  fclose(file);
}

static int run_one(TF_Session *session, TF_Output input, TF_Output *outputs, int num_outputs,
                   const char *dtype, int64_t *dims, const char *input_file,
                   const char *out_dir, TF_Status *status) {
  int is_float = strcmp(dtype, "float") == 0;
  size_t count = (size_t)(dims[0] * dims[1] * dims[2] * dims[3]);
  size_t bytes = count * (is_float ? sizeof(float) : 1);
  void *data = malloc(bytes ? bytes : 1);
  FILE *file = fopen(input_file, "rb");
  if (!file || fread(data, 1, bytes, file) != bytes) {
    fprintf(stderr, "cannot read %zu bytes from %s\n", bytes, input_file);
    return 2;
  }
  fclose(file);
  TF_Tensor *tensor = TF_NewTensor(is_float ? TF_FLOAT : TF_UINT8, dims, 4, data, bytes,
                                   free_buffer, NULL);
  TF_Tensor **values = calloc(num_outputs, sizeof(TF_Tensor *));
  TF_SessionRun(session, NULL, &input, &tensor, 1, outputs, values, num_outputs, NULL, 0,
                NULL, status);
  write_status(out_dir, status);
  TF_DeleteTensor(tensor);
  if (TF_GetCode(status) != TF_OK) {
    printf("TF_ERROR %d: %s\n", (int)TF_GetCode(status), TF_Message(status));
    free(values);
    return 0;
  }
  for (int k = 0; k < num_outputs; ++k) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/%d.bin", out_dir, k);
    FILE *out = fopen(path, "wb");
    int32_t type = (int32_t)TF_TensorType(values[k]);
    int32_t rank = (int32_t)TF_NumDims(values[k]);
    fwrite(&type, sizeof(type), 1, out);
    fwrite(&rank, sizeof(rank), 1, out);
    for (int d = 0; d < rank; ++d) {
      int64_t dim = TF_Dim(values[k], d);
      fwrite(&dim, sizeof(dim), 1, out);
    }
    fwrite(TF_TensorData(values[k]), 1, TF_TensorByteSize(values[k]), out);
    fclose(out);
    TF_DeleteTensor(values[k]);
  }
  free(values);
  printf("OK %s\n", out_dir);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 5) {
    fprintf(stderr, "usage: %s EXPORT_DIR INPUT_NAME MANIFEST OUTPUT...\n", argv[0]);
    return 2;
  }
  TF_Status *status = TF_NewStatus();
  TF_Graph *graph = TF_NewGraph();
  TF_SessionOptions *options = TF_NewSessionOptions();
  const char *tags[] = {"serve"};
  TF_Session *session = TF_LoadSessionFromSavedModel(options, NULL, argv[1], tags, 1, graph,
                                                     NULL, status);
  if (TF_GetCode(status) != TF_OK) {
    fprintf(stderr, "TF_LoadSessionFromSavedModel: %s\n", TF_Message(status));
    return 3;
  }
  TF_Output input = output_of(graph, argv[2]);
  int num_outputs = argc - 4;
  TF_Output *outputs = calloc(num_outputs, sizeof(TF_Output));
  for (int k = 0; k < num_outputs; ++k) {
    outputs[k] = output_of(graph, argv[4 + k]);
    if (!outputs[k].oper || !input.oper) {
      fprintf(stderr, "no operation for %s or %s\n", argv[2], argv[4 + k]);
      return 2;
    }
  }
  FILE *manifest = fopen(argv[3], "r");
  char dtype[16], input_file[4096], out_dir[4096];
  long long b, h, w;
  while (fscanf(manifest, "%15s %lld %lld %lld %4095s %4095s", dtype, &b, &h, &w, input_file,
                out_dir) == 6) {
    int64_t dims[4] = {b, h, w, 3};
    int code = run_one(session, input, outputs, num_outputs, dtype, dims, input_file, out_dir,
                       status);
    if (code) return code;
  }
  fclose(manifest);
  TF_CloseSession(session, status);
  TF_DeleteSession(session, status);
  TF_DeleteSessionOptions(options);
  TF_DeleteGraph(graph);
  TF_DeleteStatus(status);
  free(outputs);
  return 0;
}
'''

C_DTYPES = {1: np.float32, 3: np.int32, 4: np.uint8}  # TF_FLOAT, TF_INT32, TF_UINT8


def _compiler():
  for name in (os.environ.get('CC'), 'cc', 'gcc', 'clang'):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


@pytest.fixture(scope='module')
def c_program(tmp_path_factory):
  compiler = _compiler()
  if compiler is None:
    pytest.skip('no C compiler (cc, gcc or clang) on PATH; the C runtime test needs one')
  include, lib = tf.sysconfig.get_include(), tf.sysconfig.get_lib()
  assert os.path.exists(os.path.join(include, 'tensorflow', 'c', 'c_api.h')), include
  folder = tmp_path_factory.mktemp('c_runtime')
  source = folder / 'run_saved_model.c'
  source.write_text(C_SOURCE)
  binary = folder / 'run_saved_model'
  result = subprocess.run(
      [compiler, '-O1', '-std=c99', '-o', str(binary), str(source), f'-I{include}', f'-L{lib}',
       '-l:libtensorflow_cc.so.2', '-l:libtensorflow_framework.so.2', f'-Wl,-rpath,{lib}'],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  return binary


def _signature(directory, name='serving_default'):
  from tensorflow.core.protobuf import saved_model_pb2  # pylint: disable=g-import-not-at-top
  saved_model = saved_model_pb2.SavedModel()
  saved_model.ParseFromString((directory / 'saved_model.pb').read_bytes())
  (meta_graph,) = [m for m in saved_model.meta_graphs if 'serve' in m.meta_info_def.tags]
  return meta_graph.signature_def[name]


def _run_c(program, exported, runs, folder):
  """Runs the C program once over `runs` (uint8/float [B, H, W, 3] arrays).

  Returns:
    (completed process, [(status code, message, {output key: array})] per run).
  """
  signature = _signature(exported.directory)
  keys = sorted(signature.outputs)
  (input_info,) = signature.inputs.values()
  lines = []
  for index, images in enumerate(runs):
    data = folder / f'input{index}.bin'
    data.write_bytes(np.ascontiguousarray(images).tobytes())
    out = folder / f'out{index}'
    out.mkdir()
    dtype = 'float' if images.dtype == np.float32 else 'uint8'
    lines.append(f'{dtype} {" ".join(map(str, images.shape[:3]))} {data} {out}')
  manifest = folder / 'manifest.txt'
  manifest.write_text('\n'.join(lines) + '\n')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run(
      [str(program), str(exported.directory), input_info.name, str(manifest)] +
      [signature.outputs[k].name for k in keys],
      capture_output=True, text=True, env=env, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  answers = []
  for index in range(len(runs)):
    out = folder / f'out{index}'
    code, message = (out / 'status.txt').read_text().split('\n', 1)
    values = {}
    if int(code) == 0:
      for k, key in enumerate(keys):
        raw = (out / f'{k}.bin').read_bytes()
        dtype_code, rank = np.frombuffer(raw[:8], np.int32)
        shape = np.frombuffer(raw[8:8 + 8 * rank], np.int64)
        values[key] = np.frombuffer(raw[8 + 8 * rank:], C_DTYPES[dtype_code]).reshape(shape)
    answers.append((int(code), message, values))
  return result, answers


GOOD_INPUTS = [sample_images(21, (2, 57, 83)), sample_images(22, (1, 65, 30))]
BAD_INPUTS = [
    # (input, message): TF_Code 3 is TF_INVALID_ARGUMENT.
    (np.zeros((1, 0, 12, 3), np.uint8), 'height and width > 0'),
    (np.zeros((1, 12, 12, 3), np.float32), 'float'),
]


@pytest.fixture(scope='module')
def c_answers(c_program, exported, tmp_path_factory):
  """One C process: the good inputs, the bad ones, then a good one again."""
  runs = GOOD_INPUTS + [value for value, _ in BAD_INPUTS] + GOOD_INPUTS[:1]
  return _run_c(c_program, exported, runs, tmp_path_factory.mktemp('c_runs'))


def test_c_runtime_outputs_equal_python(c_answers, exported):
  result, answers = c_answers
  good = answers[:len(GOOD_INPUTS)] + answers[-1:]
  for (code, message, got), images in zip(good, GOOD_INPUTS + GOOD_INPUTS[:1]):
    assert code == 0, message
    want = exported.loaded.signatures['serving_default'](images=tf.constant(images))
    assert got.keys() == want.keys()
    for key, value in want.items():
      value = value.numpy()
      assert got[key].shape == value.shape and got[key].dtype == value.dtype, key
      if value.dtype == np.float32:
        np.testing.assert_allclose(got[key], value, atol=1e-5, rtol=0, err_msg=key)
      else:
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert got['num_segments'].min() >= 1
  assert result.stdout.count('OK ') == len(good)


@pytest.mark.parametrize('index', range(len(BAD_INPUTS)))
def test_c_runtime_bad_input_is_a_status_with_a_message(c_answers, index):
  _, answers = c_answers
  code, message, values = answers[len(GOOD_INPUTS) + index]
  assert code == 3, (code, message)
  assert BAD_INPUTS[index][1] in message, message
  assert not values
