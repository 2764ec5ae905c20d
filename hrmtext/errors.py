"""The error every layer raises for what the user must fix. No dependencies: the lowest layer."""


class UserError(ValueError):
  """Bad input from the user, anywhere in the program: an entry point (hrmtext.cli) shows it as
  one line and exits with status 1.

  A ValueError, so code that checks values and raises ValueError for them keeps working; raise
  this (or OSError, which counts too) for what the user must fix, never for internal checks.
  """
