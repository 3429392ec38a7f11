"""ttl installs beside transformers: none of its import names is one that transformers' own dependencies use.
transformers >= 5.25 requires Hugging Face's `kernels` package and imports it on `import transformers`'s model
code; a top-level `kernels` of ours (in site-packages or in the checkout, first on sys.path under `python -m`)
would shadow it and break every transformers and peft import."""

import importlib
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_huggingface_kernels_is_not_shadowed():
    spec = importlib.util.find_spec("kernels")
    if spec is not None:  # installed (transformers >= 5.25): it must be Hugging Face's, not a folder of ours
        assert ROOT not in Path(spec.origin).parents, spec.origin
    importlib.import_module("transformers.integrations.hub_kernels")  # what failed when it was shadowed
    assert importlib.import_module("ttl_kernels").__file__.startswith(str(ROOT))
