"""A pruned model survives a save / load round trip in a fresh process: config (with the pruned
widths) + state dict, re-applied to a model built from the config."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from orprune.transformer import TransformerPruner, kept_widths
from tests.transformer.models import BUILDERS, batches, output

torch.set_num_threads(1)

LOAD = textwrap.dedent("""
    import sys, torch, transformers
    from orprune.transformer import kept_widths, restore_widths
    for directory, class_name in zip(sys.argv[1::2], sys.argv[2::2]):
        config = transformers.AutoConfig.from_pretrained(directory)
        model = getattr(transformers, class_name)(config).eval()
        restore_widths(model, state_dict=torch.load(directory + "/state.pt"))
        saved = torch.load(directory + "/check.pt")
        assert kept_widths(model) == saved["widths"], (kept_widths(model), saved["widths"])
        with torch.no_grad():
            out = model(saved["input"])
        out = out.logits if hasattr(out, "logits") else out.last_hidden_state
        torch.testing.assert_close(out, saved["output"], rtol=1e-5, atol=1e-6)
        print("ok", directory)
""")


CASES = [("llama", "orprune"), ("llama", "flap"), ("gpt2", "orprune"), ("bert", "orprune"), ("vit", "wanda_sp")]


def test_round_trip_in_a_fresh_process(tmp_path):
    args = []
    for arch, method in CASES:  # flap adds biases to LLaMA's bias-free o_proj/down_proj
        pruner = TransformerPruner().fit(BUILDERS[arch](), batches(arch))
        model = pruner.prune(params=0.6, method=method).model
        widths = kept_widths(model)
        assert widths != kept_widths(pruner.model_)  # something was pruned
        assert model.config.orprune_widths == widths
        batch = batches(arch, n=1, seed=5)[0]
        directory = tmp_path / f"{arch}-{method}"
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "state.pt")
        torch.save({"widths": widths, "input": batch, "output": output(model, batch)}, directory / "check.pt")
        args += [str(directory), type(model).__name__]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD, *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("ok") == len(CASES)
