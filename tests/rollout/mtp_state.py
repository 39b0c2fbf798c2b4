"""A watch on the engine's MTP state, shared by the speculative and adaptive tests (not a test module): before every
draft, each live row's draft logits q_root and stored MTP hidden states must equal a fresh full forward over the
row's committed sequence."""

from __future__ import annotations

import torch

import mtprl.rollout.engine as engine_mod
from mtprl.rollout import Engine


def watch_mtp_state(monkeypatch, model, num_mtp: int) -> dict:
    """Patch the engine so that every draft first checks the state; returns {"rows": rows checked so far}."""
    checks = {"rows": 0}
    original_spec_step, original_draft = Engine._spec_step, engine_mod.draft_tree

    def spec_step(self, run, b, depth):
        checks["run"] = run
        return original_spec_step(self, run, b, depth)

    def draft(model_, tree, tt, mtp, lengths, root, spec_rows, b, *args):
        rows = checks["run"].rows
        for i in range(b):
            L = int(lengths[i])
            out = model(rows.tokens[i, :L][None])
            torch.testing.assert_close(spec_rows.q_root_logits[i], out.mtp_logits[0][0, L - 2], atol=1e-4, rtol=1e-4)
            for k in range(1, num_mtp + 1):
                if L - 1 - k >= 0:
                    torch.testing.assert_close(spec_rows.stored_h[i, k - 1], out.mtp_hidden_states[k - 1][0, L - 1 - k],
                                               atol=1e-4, rtol=1e-4)
            checks["rows"] += 1
        return original_draft(model_, tree, tt, mtp, lengths, root, spec_rows, b, *args)

    monkeypatch.setattr(Engine, "_spec_step", spec_step)
    monkeypatch.setattr(engine_mod, "draft_tree", draft)
    return checks
