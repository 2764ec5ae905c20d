"""What every `python -m hrmtext.*` entry point shares."""
from absl import flags, logging


def quiet_logs() -> None:
  """absl's app.run logs at INFO, where Orbax alone writes ~50 lines per checkpoint and buries
  the progress output; keep WARNING and above unless --verbosity was given."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
