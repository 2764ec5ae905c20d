"""What every `python -m hrmtext.*` (and `launch.*`) entry point shares: `run(main)`.

The error policy, the same everywhere: a user error (hrmtext.errors.UserError or an OSError: a
bad or stray flag, a missing or malformed input, an unwritable output) prints one line
`error: ...` on stderr and exits non-zero: 2 for the command line itself, 1 for the rest.
Anything else is a bug and keeps its traceback.
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from hrmtext.errors import UserError

USAGE_EXIT = 2  # bad command line
ERROR_EXIT = 1  # bad input or environment

# What the runner reports in one line. OSError: files missing, unreadable or unwritable.
USER_ERRORS = (UserError, OSError)


def one_line(error: BaseException) -> str:
  """The message of `error` on one line (some libraries' messages span several)."""
  while len(error.args) == 1 and isinstance(error.args[0], BaseException):
    error = error.args[0]  # e.g. ml_collections' AttributeError(KeyError(...))
  # str(KeyError('x')) is "'x'": its message is the argument itself.
  message = error.args[0] if isinstance(error, KeyError) and len(error.args) == 1 else error
  if isinstance(error, OSError) and error.filename and error.strerror:  # not "[Errno 2] ..."
    message = f'{error.filename}: {error.strerror}'
  return ' '.join(str(message).split())


def fail(message: str, status: int = ERROR_EXIT):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def define_config_file(name: str, default: str, help_string: str):
  """ml_collections' DEFINE_config_file with the one-line policy for --NAME.a.b=value overrides,
  which it already checks here (while defining the flag, from sys.argv)."""
  try:
    return config_flags.DEFINE_config_file(name, default, help_string)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    fail(f'bad --{name}: {one_line(e)}', USAGE_EXIT)


def _parse_flags(argv):
  """absl's parsing with one-line errors; loads flag values (e.g. --config files) right away."""
  try:
    remaining = flags.FLAGS(argv)
    for name in flags.FLAGS:  # config files load (and fail) when read
      flags.FLAGS[name].value  # pylint: disable=expression-not-assigned
  except flags.Error as e:
    fail(f'{one_line(e)} (--help lists the flags)', USAGE_EXIT)
  except SyntaxError as e:  # in the config file (or a module it imports): say where
    fail(f'bad --config: {e.filename}:{e.lineno}: {e.msg}', USAGE_EXIT)
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    # Raised only by ml_collections while applying --config.a.b=value overrides or loading the
    # config file: a field that does not exist, a value of the wrong type, a missing file.
    fail(f'bad --config: {one_line(e)}', USAGE_EXIT)
  return remaining


def run(main, *, multi_process: bool = False, extra_args: bool = False) -> None:
  """Runs `main(argv)` as an absl app under the shared policy.

  Stray positional arguments are refused unless `extra_args` (a launcher's COMMAND...);
  `multi_process` joins the processes of a multi-host run first (distributed.initialize()).
  Logs: absl at WARNING (Orbax writes ~50 INFO lines per checkpoint) unless --verbosity is given.
  """

  def wrapped(argv):
    if len(argv) > 1 and not extra_args:
      fail(f'unexpected arguments: {" ".join(argv[1:])} (--help lists the flags)', USAGE_EXIT)
    quiet_logs()
    from hrmtext.parallel import accelerator  # pylint: disable=g-import-not-at-top
    accelerator.configure_environment()  # before JAX starts a backend
    try:
      if multi_process:
        from hrmtext.parallel import distributed  # pylint: disable=g-import-not-at-top (jax)
        distributed.initialize()
      main(argv)
    except app.UsageError as e:
      fail(one_line(e), USAGE_EXIT)
    except USER_ERRORS as e:
      fail(one_line(e))

  app.run(wrapped, flags_parser=_parse_flags)


def quiet_logs() -> None:
  """absl at WARNING unless --verbosity was given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
