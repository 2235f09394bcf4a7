"""Plants named single-line bugs, one at a time, in a temporary copy of the checkout and runs
the tests that should catch each; reports which mutants survive (a surviving mutant is a hole
in the suite). Not part of CI (several minutes); run it before resolving a testing issue:

    python scripts/mutants.py                 # every mutant; exit 1 if any survives
    python scripts/mutants.py --only kl_shift # by name (repeatable)
    python scripts/mutants.py --list
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str          # file in the checkout
    old: str           # exact text, must occur once
    new: str
    tests: tuple       # pytest arguments that must fail


MUTANTS = [
    Mutant("shard_argmax_offset", "fusedpref/distributed.py",
           "planes = torch.cat([planes, (arg.to(torch.int64) + self.offset).to(planes.dtype)[None]])",
           "planes = torch.cat([planes, arg.to(planes.dtype)[None]])",
           ("tests/test_distributed.py", "-k", "primitives and torch and 3")),
    Mutant("shard_dh_not_reduced", "fusedpref/_library.py", "        dh_v = rows.reduce_(dh_v)",
           "        pass", ("tests/test_distributed.py", "-k", "primitives and torch and 2")),
    Mutant("shard_frozen_direction_unscaled", "fusedpref/_partials.py",
           "return acc * torch.exp(part_max - merged_max)[:, None].to(acc.dtype) / total[:, None].to(acc.dtype)",
           "return acc / total[:, None].to(acc.dtype)",
           ("tests/test_distributed.py", "-k", "primitives and triton and 2")),
    Mutant("fsdp2_gather_unreduced", "fusedpref/_dtensor.py",
           'return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)', "return t.full_tensor()",
           ("tests/test_distributed.py", "-k", "fsdp2")),
    Mutant("dz_chunk_offset", "kernels/logprobs.py", "v0 = v_lo + col0", "v0 = col0",
           ("tests/test_logprobs.py", "-k", "triton and forward_backward")),
    Mutant("sigmoid_drops_label_smoothing", "fusedpref/losses.py",
           "return _smoothed_sigmoid(p.beta * p.margin, p.label_smoothing)",
           "return _smoothed_sigmoid(p.beta * p.margin, 0.0)", ("tests/test_losses.py",)),
    Mutant("kto_rewards_swapped", "fusedpref/api.py",
           'metrics = {"rewards/chosen": masked_mean(rewards, d), "rewards/rejected": masked_mean(rewards, u),',
           'metrics = {"rewards/chosen": masked_mean(rewards, u), "rewards/rejected": masked_mean(rewards, d),',
           ("tests/test_kto.py",)),
    Mutant("torch_argmax_offset", "fusedpref/chunked.py", "self.aidx = torch.where(better, carg + v0, self.aidx)",
           "self.aidx = torch.where(better, carg, self.aidx)", ("tests/test_logprobs.py", "-k", "torch and stats")),
    Mutant("triton_argmax_offset", "kernels/tiles.py", "tile_arg = (tl.argmax(z, axis=1) + v0).to(tl.int32)",
           "tile_arg = tl.argmax(z, axis=1).to(tl.int32)", ("tests/test_logprobs.py", "-k", "triton and stats")),
    Mutant("kl_shift_dropped", "kernels/kl.py", "a = alpha_r * (a + l_r * shift) + tl.sum(pr * diff, axis=1)",
           "a = alpha_r * a + tl.sum(pr * diff, axis=1)", ("tests/test_kl.py", "-k", "triton and kl_matches")),
    Mutant("split_combine_unscaled", "fusedpref/_partials.py", "return big, scale, (l * scale).sum(0)",
           "return big, scale, l.sum(0)", ("tests/test_logprobs.py", "-k", "triton and forward_backward")),
    Mutant("softcap_derivative", "kernels/tiles.py", "        dz = dz * (1.0 - c * c)", "        dz = dz * (1.0 - c)",
           ("tests/test_logprobs.py", "-k", "triton and forward_backward and cap")),
    Mutant("ipo_target_margin", "fusedpref/losses.py", "return (delta - 1 / (2 * p.beta)) ** 2",
           "return (delta - 1 / p.beta) ** 2", ("tests/test_losses.py", "-k", "ipo")),
    Mutant("entropy_metric_chosen_only", "fusedpref/api.py", '"entropy": token_mean(stats[..., 1], m),',
           '"entropy": token_mean(stats[:b, :, 1], mc),', ("tests/test_losses.py", "-k", "trl_reference and torch")),
    Mutant("nll_counts_all_tokens", "fusedpref/api.py",
           "return -logps[:b].sum() / mask[:b].sum().clamp(min=1).to(logps.dtype)",
           "return -logps[:b].sum() / mask.sum().clamp(min=1).to(logps.dtype)", ("tests/test_losses.py", "-k", "sft")),
    Mutant("orpo_unstable_log1mexp", "fusedpref/losses.py",
           "return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))",
           "return torch.log1p(-torch.exp(x))", ("tests/test_reliability.py", "-k", "orpo")),
    Mutant("no_target_range_check", "fusedpref/_library.py", "            if err is not None:\n                raise err",
           "            if err is not None:\n                pass", ("tests/test_errors.py",)),
    Mutant("autocast_ignored", "fusedpref/functions.py", "    if dt is None:\n        return heads",
           "    if True:\n        return heads", ("tests/test_reliability.py", "-k", "autocast")),
    Mutant("trl_mean_logits", "fusedpref/integrations/trl.py", "mean_logits = stats[:, 0].detach() / weight.shape[0]",
           "mean_logits = stats[:, 0].detach() / (weight.shape[0] - 1)",
           ("tests/test_trl_integration.py", "-k", "matches_trls_own")),
    Mutant("kl_dz_sign", "kernels/kl.py", "dz = g[:, None] * (p - tl.exp(logq))",
           "dz = g[:, None] * (tl.exp(logq) - p)", ("tests/test_kl.py", "-k", "triton and kl_matches")),
    Mutant("entropy_grad_sign", "kernels/tiles.py", "return (g_sum[:, None] - g_ent[:, None]",
           "return (g_sum[:, None] + g_ent[:, None]",
           ("tests/test_head_options.py", "-k", "triton and statistics and plain")),
    Mutant("sum_sq_rescale", "kernels/tiles.py", "q = q * alpha * alpha + tl.sum(p * p, axis=1)",
           "q = q * alpha + tl.sum(p * p, axis=1)", ("tests/test_head_options.py", "-k", "triton and statistics and plain")),
    Mutant("reverse_kl_shift_dropped", "kernels/kl.py", "a = alpha_z * (a + l_z * shift) - tl.sum(p * diff, axis=1)",
           "a = alpha_z * a - tl.sum(p * diff, axis=1)",
           ("tests/test_head_options.py", "-k", "triton and divergence_matches and reverse")),
    Mutant("jsd_grad_drops_kl", "kernels/kl.py", "p * (logp - logm - aux[:, None])", "p * (logp - logm)",
           ("tests/test_head_options.py", "-k", "triton and divergence_matches and jsd")),
    Mutant("torch_scale_cap_chain", "fusedpref/_partials.py", "c = softcap if scale is None else scale * softcap",
           "c = softcap", ("tests/test_head_options.py", "-k", "torch and statistics and cap")),
    Mutant("frozen_torch_rescale_dropped", "fusedpref/chunked.py",
           "acc = torch.addmm(acc.mul_(alpha[:, None]), p, pol.w[v0:v1].to(hf.dtype))",
           "acc = torch.addmm(acc, p, pol.w[v0:v1].to(hf.dtype))",
           ("tests/test_frozen.py", "-k", "torch and one_pass_equals and chunks97")),
    Mutant("frozen_triton_row_scale_dropped", "kernels/matmul.py",
           "        c = c * tl.load(s_ptr + m0 + om, mask=m_mask, other=0.0)[:, None]", "        c = c",
           ("tests/test_frozen.py", "-k", "triton and one_pass_equals and chunks97")),
    Mutant("frozen_kl_direction_sign", "fusedpref/_library.py", 'res["d_kl"] = ep - expectation(',
           'res["d_kl"] = -ep + expectation(',
           ("tests/test_frozen.py", "-k", "triton and logprobs_kl_one_pass and plain")),
    Mutant("trl_cap_order", "fusedpref/integrations/trl.py", "cap = None if softcap is None else float(softcap) / abs(s)",
           "cap = None if softcap is None else float(softcap)",
           ("tests/test_trl_integration.py", "-k", "every_output")),
    # reliability round 3: the classes of planted bugs the suite let through before
    # (a) the grouped program order beyond one band (every kernel test ran <= 4 row blocks)
    Mutant("grouped_band_offset", "kernels/schedule.py", "first_m = (pid // width) * GROUP_M",
           "first_m = pid // width", ("tests/test_bands.py",)),
    # (b) options only at defaults or in symmetric data
    Mutant("rejected_length_swapped", "fusedpref/losses.py", "return self.rejected / self.rejected_len",
           "return self.rejected / self.chosen_len", ("tests/test_losses.py", "-k", "torch and (simpo or average)")),
    Mutant("nll_default_ignore_index", "fusedpref/api.py",
           "return -tok.sum() / (nt != heads.ignore_index).sum().clamp(min=1).to(tok.dtype)",
           "return -tok.sum() / (nt != -100).sum().clamp(min=1).to(tok.dtype)",
           ("tests/test_losses.py", "-k", "nll and torch")),
    Mutant("temperature_dropped", "fusedpref/functions.py",
           "return Transform(cap, check_scale(s / check_temperature(temperature), names[1]))",
           "return Transform(cap, check_scale(s, names[1]))", ("tests/test_losses.py", "-k", "temperature and torch")),
    Mutant("reference_takes_the_policy_transform", "fusedpref/api.py",
           'self.ref = ref_transform(opts["ref_softcap"]', 'self.ref = self.policy if True else ref_transform(opts["ref_softcap"]',
           ("tests/test_losses.py", "-k", "ref_softcap and torch")),
    Mutant("frozen_teacher_takes_the_student_transform", "fusedpref/ops.py",
           "mr_new = torch.maximum(mr_run, _chunk_logits(ref, r_buf, v0, v1))",
           "mr_new = torch.maximum(mr_run, _chunk_logits(ref._replace(xf=pol.xf), r_buf, v0, v1))",
           ("tests/test_frozen.py", "-k", "teacher and triton")),
    Mutant("target_id_zero_not_owned", "fusedpref/_partials.py", "own = (y >= 0) & (y < w.shape[0])",
           "own = (y > 0) & (y < w.shape[0])", ("tests/test_frozen.py", "-k", "target_id_zero and torch")),
    # (c) distributed edge cases
    Mutant("empty_shard_argmax_zero", "fusedpref/_partials.py", '        part[PLANES["amax"]] = float("-inf")',
           '        part[PLANES["amax"]] = 0.0', ("tests/test_distributed.py", "-k", "edges and torch")),
    Mutant("unreduced_dh_reduced_anyway", "fusedpref/_library.py",
           "if needs.h and sharded and call.reduce_hidden_grad and rows.count:",
           "if needs.h and sharded and rows.count:", ("tests/test_distributed.py", "-k", "edges and torch")),
    Mutant("ranks_dtype_unchecked", "fusedpref/distributed.py", "        if len({row[6] for row in every}) != 1:",
           "        if False:", ("tests/test_distributed.py", "-k", "disagree and dtype")),
    # (d) TRL branches the CPU does not take by default
    Mutant("trl_compacted_rows_shifted", "fusedpref/integrations/trl.py", "mask = labels[:, 1:] != -100",
           "mask = labels[:, :-1] != -100", ("tests/test_trl_expo.py", "-k", "compacted")),
    Mutant("trl_zero3_gather_unregistered", "fusedpref/integrations/trl.py",
           "functions.set_weight_gather(maybe_gather_lm_head_ctx)", "functions.set_weight_gather(None)",
           ("tests/test_trl_integration.py", "-k", "zero3")),
    Mutant("trl_expo_logit_scale_dropped", "fusedpref/integrations/trl.py",
           "logit_scale=scale, use_weighting=bool(self.use_weighting), **ref, **extra)",
           "use_weighting=bool(self.use_weighting), **ref, **extra)", ("tests/test_trl_expo.py", "-k", "logit_scale")),
    # (e) memory: the torch backend's chunk buffers
    Mutant("torch_backward_keeps_the_last_chunk", "fusedpref/chunked.py",
           "        del dz                                   # before the next chunk's buffers exist",
           "        pass", ("tests/test_chunk_memory.py", "-k", "sigmoid and trainable and not ref")),
    # the engines (tests/test_engines.py): the gather paths under DeepSpeed ZeRO-3 and FSDP2
    Mutant("zero3_recompute_reads_partitioned_head", "fusedpref/functions.py",
           "        with gathered(weight, bias, ref_weight, ref_bias) if reads_weights else contextlib.nullcontext():",
           "        with contextlib.nullcontext():",
           ("tests/test_engines.py", "-k", "outside_a_forward")),
    Mutant("expo_reference_head_not_kept", "fusedpref/integrations/trl.py",
           'return dict(ref_hidden=hidden.detach(), ref_weight=call["weight"].detach().clone(),',
           'return dict(ref_hidden=hidden.detach(), ref_weight=call["weight"].detach(),',
           ("tests/test_engines.py", "-k", "expo and zero3")),
]


def _copy_tree(dst):
    common = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis",
                                    "out", "bench")

    def ignore(src, names):
        # a checkout may link fusedpref/kernels to kernels/ itself (an uninstalled working tree)
        extra = {"kernels"} if os.path.abspath(src) == os.path.join(ROOT, "fusedpref") else set()
        return set(common(src, names)) | (extra & set(names))
    shutil.copytree(ROOT, dst, ignore=ignore)
    # the installed layout: kernels/ is importable as fusedpref.kernels
    os.symlink(os.path.join(dst, "kernels"), os.path.join(dst, "fusedpref", "kernels"))


def run_one(m: Mutant, python: str, timeout: float) -> tuple[str, float]:
    with tempfile.TemporaryDirectory(prefix="fusedpref-mutant-") as tmp:
        tree = os.path.join(tmp, "tree")
        _copy_tree(tree)
        path = os.path.join(tree, m.path)
        text = open(path).read()
        if text.count(m.old) != 1:
            return f"stale: {m.old!r} occurs {text.count(m.old)} times in {m.path}", 0.0
        open(path, "w").write(text.replace(m.old, m.new))
        env = {**os.environ, "PYTHONPATH": tree, "PYTHONDONTWRITEBYTECODE": "1"}
        where = subprocess.run([python, "-c", "import fusedpref, fusedpref.kernels as k; print(fusedpref.__file__, "
                                "k.__file__)"], capture_output=True, text=True, env=env, cwd=tree)
        if tree not in where.stdout:
            return f"error: the copy is not what gets imported ({where.stdout.strip()} {where.stderr[-300:]})", 0.0
        t0 = time.time()
        try:
            proc = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *m.tests],
                                  capture_output=True, text=True, env=env, cwd=tree, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)", time.time() - t0
        dt = time.time() - t0
        if proc.returncode == 1:
            return "killed", dt
        if proc.returncode == 0:
            return "SURVIVED", dt
        return f"error: pytest exit {proc.returncode}: {proc.stdout[-300:]}", dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="run this mutant (by name); repeatable")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mutant (default 600)")
    a = p.parse_args(argv)
    if a.list:
        for m in MUTANTS:
            print(f"{m.name:32s} {m.path}: {m.old.strip()!r} -> {m.new.strip()!r}")
        return 0
    chosen = [m for m in MUTANTS if not a.only or m.name in a.only]
    unknown = set(a.only) - {m.name for m in MUTANTS}
    if unknown:
        p.error(f"unknown mutant(s) {sorted(unknown)}; see --list")
    t_all = time.time()
    bad = 0
    for m in chosen:
        verdict, dt = run_one(m, sys.executable, a.timeout)
        bad += not verdict.startswith("killed")
        print(f"{m.name:32s} {verdict:10s} {dt:6.1f} s   ({' '.join(m.tests)})", flush=True)
    print(f"# {len(chosen) - bad} of {len(chosen)} mutants killed in {time.time() - t_all:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
