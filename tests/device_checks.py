"""Checks that need several devices: run once, in a subprocess with N simulated CPU devices
(--xla_force_host_platform_device_count), so the pytest process keeps its single device.

In a test file:

  device_check = DeviceChecks(__file__)

  @device_check
  def some_check(): ...             # runs in the subprocess; raises to fail

  @pytest.fixture(scope='module')
  def device_check_output():
    return device_check.output()

  @pytest.mark.parametrize('name', list(device_check.checks))
  def test_on_8_cpu_devices(name, device_check_output):
    device_check.assert_passed(name, device_check_output)

  if __name__ == '__main__':
    device_check.run()
"""
import os
import subprocess
import sys
import traceback

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class DeviceChecks:

  def __init__(self, path: str, num_devices: int = 8):
    self.path, self.num_devices, self.checks = os.path.abspath(path), num_devices, {}

  def __call__(self, fn):
    """Registers `fn` as a check."""
    self.checks[fn.__name__] = fn
    return fn

  def output(self, **env) -> str:
    """The subprocess's output: a PASS or FAIL line per check (`env`: more variables)."""
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO, **env,
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={self.num_devices}'}
    result = subprocess.run([sys.executable, self.path], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    return result.stdout + result.stderr

  @staticmethod
  def assert_passed(name: str, output: str) -> None:
    assert f'PASS {name}' in output, output

  def run(self) -> None:
    """In the subprocess: every check, each reported on its own line."""
    assert len(jax.devices()) == self.num_devices, jax.devices()
    for name, check in self.checks.items():
      try:
        check()
        print(f'PASS {name}')
      except Exception:  # reported to the pytest process, which fails that check's test
        print(f'FAIL {name}\n{traceback.format_exc()}')
