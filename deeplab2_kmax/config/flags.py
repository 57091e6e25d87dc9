"""The --config_file / --config_override flags shared by every command-line tool."""

from absl import flags

from deeplab2_kmax.config import loader


def define_config_flags(required: bool = True):
  """Defines --config_file and --config_override (call once, at module level of a main)."""
  flags.DEFINE_string('config_file', None, 'Path of an ExperimentOptions textproto.',
                      required=required)
  flags.DEFINE_multi_string(
      'config_override', [],
      'Textproto snippet merged over the config file, e.g. '
      '"trainer_options { solver_options { base_learning_rate: 1e-4 } }". Repeatable; applied '
      'in order; a repeated field given here replaces the file\'s list.')


def load_from_flags(num_replicas: int = 1, validate: bool = True, inference: bool = False):
  """Loads the config named by the flags; raises loader.ConfigError.

  Args:
    inference: the command only builds the model and runs it (export, predict): an unset
      ${VAR} in what it does not read (data files, initial checkpoint:
      loader.INFERENCE_UNREAD_FIELDS) is no error.
  """
  unread_fields = loader.INFERENCE_UNREAD_FIELDS if inference else ()
  return loader.load_config(flags.FLAGS.config_file, flags.FLAGS.config_override,
                            validate=validate, num_replicas=num_replicas,
                            unread_fields=unread_fields)
