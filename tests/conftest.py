"""Every test runs fp32 whatever the CPU: `--amp auto` (the demo presets' default) would pick bf16
on a CPU with native bf16 and fp32 elsewhere, so the same test would compare different numbers on
different machines. The scripts the tests start inherit this environment; a test that wants bf16
asks for it with --amp bf16."""
import os

os.environ["POSE_AMP_AUTO"] = "none"
