"""Worker extension (vLLM mixes it into the worker class): UniPrefill's view from a worker.

Selected through `worker_extension_cls` when UniPrefill is enabled; callable from the front end
with `llm.collective_rpc("uniprefill_status")`. vLLM imports this module in each worker process
of such an engine, before the model runner exists: that is where the worker-side patches go in.
"""

from __future__ import annotations

import os
from typing import Any

from uniprefill.config import CONFIG_KEY
from uniprefill.vllm_glue.coupling import runner_missing_attributes
from uniprefill.vllm_glue.patches import applied_patches, apply_patches
from uniprefill.vllm_glue.runner_patches import pruner_of

apply_patches("worker")


class UniPrefillWorkerExtension:
    vllm_config: Any  # provided by the worker class this is mixed into
    model_runner: Any

    def uniprefill_status(self) -> dict[str, Any]:
        """What this worker process sees: its pid, the vLLM patches applied here, settings, and
        what the model runner lacks of the vLLM attributes UniPrefill reads (empty unless vLLM
        drifted)."""
        return {
            "pid": os.getpid(),
            "patches": applied_patches(),
            "runner_missing_attributes": runner_missing_attributes(self.model_runner),
            "config": self.vllm_config.additional_config.get(CONFIG_KEY),
        }

    def uniprefill_requests(self) -> dict[str, Any]:
        """Pruned requests still holding per-stage KV offsets; pruned prompts in chunks whose
        rows are held at the first drop layer (rows, bytes); the most recent pruned prefills,
        oldest first (request id, keep counts: prompt, then after each drop layer, token-layers
        unpruned and saved, ideal speedup: uniprefill.accounting.pruned_prompt); and how many
        steps scored or held prompts (those run eager)."""
        pruner = pruner_of(self.model_runner)
        if pruner is None:
            return {"live": {}, "held": {}, "recent": [], "eager_steps": 0}
        state = pruner.state
        live = {req_id: list(offsets) for req_id, offsets in state.kv_offsets.items()}
        held = {req_id: [h.num_rows, h.nbytes] for req_id, h in state.held.items()}
        return {
            "live": live,
            "held": held,
            "recent": list(state.recent),
            "eager_steps": pruner.eager_steps,
        }

    def uniprefill_selections(self) -> list[dict]:
        """Tests only: every selection this worker ran since the last call (what it saw and
        kept, hooks._selection_record), when its engine started with hooks.RECORD_ENV set;
        else an empty list."""
        pruner = pruner_of(self.model_runner)
        records = pruner.hooks.selections if pruner is not None else None
        if not records:
            return []
        taken = list(records)
        records.clear()
        return taken
