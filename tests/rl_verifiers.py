"""A user verifier for the RL tests (rl.prompts rows name it as tests.rl_verifiers:even_length):
half of a random model's samples get 1, so nearly every group is informative."""


def even_length(response: str, row: dict) -> float:
  del row
  return float(len(response) % 2 == 0)
