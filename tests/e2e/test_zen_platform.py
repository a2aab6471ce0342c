"""UniPrefill on vLLM's ZenCpuPlatform, the CPU platform vLLM picks on AMD Zen CPUs (AVX-512)
when zentorch is installed (`make test` installs it there). It subclasses the CPU platform and
routes linear layers through zentorch; UniPrefill's hooks and the model runner are the same, but
the numbers feeding the selection differ. On such a CPU the whole suite runs on it; this test
also runs the plain CPU platform next to it (zentorch hidden) and holds both to the reference.
"""

import importlib.util
import os

import pytest
from vllm.platforms import _is_amd_zen_cpu

from tests.e2e.helpers import TINY_SETTINGS, check_against_reference, random_prompts, run_offline

pytestmark = pytest.mark.skipif(
    not (_is_amd_zen_cpu() and importlib.util.find_spec("zentorch")),
    reason="vLLM picks ZenCpuPlatform only on AMD CPUs with AVX-512 and zentorch installed "
    "(`make test` installs it there)",
)


@pytest.mark.parametrize("platform", ["ZenCpuPlatform", "CpuPlatform"])
def test_uniprefill_prunes_as_the_reference_does(prepared, tmp_path, platform):
    env = dict(os.environ)
    if platform == "CpuPlatform":  # vLLM falls back to it when zentorch does not import
        (tmp_path / "zentorch").mkdir()
        (tmp_path / "zentorch" / "__init__.py").write_text("raise ImportError('hidden')\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    model = prepared("tiny-llama")
    batch = random_prompts()
    prompts = [{"prompt_token_ids": p} for p in batch]
    result, _ = run_offline(model, "enabled", prompts, env=env, settings=TINY_SETTINGS)
    assert result["platform"] == platform
    determined = check_against_reference(
        model, batch, TINY_SETTINGS, result["kept"], result["tokens"]
    )
    # random prompts on a random model: one may score within the rounding margin at a drop
    # layer (then it is checked within the margin, uniprefill/ops/select/margin.py)
    assert determined >= len(batch) - 1
    assert sum(k is not None and k[-1] < k[0] for k in result["kept"]) == 3
