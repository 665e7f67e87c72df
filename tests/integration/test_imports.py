"""What importing the package costs, in a fresh interpreter: no megatron-core until a name needs it,
no output, and none at all for the layout and the planner."""

import subprocess
import sys


def test_package_import_is_silent_and_light():
    code = (
        "import sys, mst_megatron; assert 'megatron.core' not in sys.modules; "
        "mst_megatron.MSTGPTModel; mst_megatron.get_gpt_mst_layer_spec"
    )
    # Python's default warning filters, as a user gets them.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr


def test_layout_module_imports_no_megatron():
    code = ("import sys, mst_megatron.layout, mst_megatron.launch.plan; "
            "print([m for m in sys.modules if m.split('.')[0] == 'megatron'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
