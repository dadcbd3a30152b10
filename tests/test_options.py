"""The command line answers help, version and bad arguments without loading the heavy libraries, and the
choices it lists are the ones the library implements."""

from __future__ import annotations

import subprocess
import sys

from pfp_onnx import calibration_images, options


def test_preset_choices_are_the_defined_presets():
    assert options.IMAGE_PRESETS == tuple(calibration_images.PRESETS)


def test_help_and_bad_arguments_load_no_heavy_module():
    """--help, --version and a refused argument answer without importing onnx, onnxruntime, numpy or numba
    (what made `pfp-onnx --version` take over a second); the time itself is measured in the report, not here."""
    probe = ("import sys\nfrom pfp_onnx_cli.main import main\n"
             "for args in (['--version'], ['--help'], ['compress', '--help'], ['calib', '--help'],"
             " ['compress', '--bogus']):\n"
             "    try:\n        main(args)\n    except SystemExit:\n        pass\n"
             "heavy = sorted(m for m in ('onnx', 'onnxruntime', 'numpy', 'numba', 'PIL') if m in sys.modules)\n"
             "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "HEAVY []", done.stdout[-500:]


def test_the_package_loads_its_api_on_first_use():
    probe = ("import sys, pfp_onnx\nassert 'onnx' not in sys.modules and 'numpy' not in sys.modules\n"
             "from pfp_onnx.sweep import write_csv\nassert callable(pfp_onnx.sweep) and 'onnx' not in sys.modules\n"
             "from pfp_onnx import compress\nassert 'onnx' in sys.modules and pfp_onnx.compress is compress\n"
             "assert pfp_onnx.calibration_set.__module__ == 'pfp_onnx.calibration_images'\n"
             "assert set(pfp_onnx.__all__) <= set(dir(pfp_onnx))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
