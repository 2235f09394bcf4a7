"""`fusedpref desiderata --lm`: the EXPO/TYPO papers' two claims on a language model, through
TRL's DPOTrainer after patch_trl().

The task has a known answer. Each prompt has K = 3 candidate responses (3-token sequences over a
small vocabulary, then <eos>), a reference distribution pi_ref over them and a Bradley-Terry reward
r = log pi*, whose preference-optimal policy is pi*. "Good" prompts have pi_ref = pi*
([0.6, 0.3, 0.1]); "bad" prompts pi* = [0.6, 0.2, 0.2], pi_ref = [0.4, 0.2, 0.4] (the tabular
experiment's, `fusedpref desiderata`).

1. The reference model: a tiny LlamaForCausalLM from a config, trained here (plain SFT: the
   pi_ref-weighted NLL of the candidates) until its candidate distribution is close to pi_ref;
   reported: KL(pi_ref || model) over the candidates and the mass it puts outside them.
2. Preference pairs: y1, y2 drawn from pi_ref, ties dropped, y1 preferred with probability
   sigmoid(r(y1) - r(y2)).
3. DPO (sigmoid), IPO and EXPO trained from the reference through trl.DPOTrainer (patched), for a
   range of lambda (= beta), the same steps and optimizer for all; each run's sequence-level policy
   over the candidates computed exactly by scoring every candidate.

Rows: {loss, lam, kl_good, kl_bad, mass_out, reward_acc, first_loss, final_loss}, kl_* =
KL(pi* || pi_theta) over the candidates (renormalised) averaged over the good / bad prompts; beside
them the exact minimisers of the tabular theory on the same pairs (a free table of logits per
prompt: what the LM would reach if it could represent any candidate distribution and nothing else).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

LOSSES = ("sigmoid", "ipo", "expo")
GOOD = {"pi_star": [0.6, 0.3, 0.1], "pi_ref": [0.6, 0.3, 0.1]}
BAD = {"pi_star": [0.6, 0.2, 0.2], "pi_ref": [0.4, 0.2, 0.4]}
LAMBDAS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
N_WORDS = 12                  # response vocabulary r0..r11


def _vocab(n_prompts):
    words = ["<pad>", "<eos>", "<unk>"] + [f"p{i}" for i in range(n_prompts)] + [f"r{i}" for i in range(N_WORDS)]
    return {w: i for i, w in enumerate(words)}


def _tokenizer(vocab):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                unk_token="<unk>")


def _model(vocab_size, seed):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                   pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return transformers.LlamaForCausalLM(cfg)


class Task:
    """The prompts (half good, half bad), their candidates, pi_ref and pi*."""

    def __init__(self, n_prompts=8, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = _vocab(n_prompts)
        self.specs = [GOOD if i % 2 == 0 else BAD for i in range(n_prompts)]
        self.prompts = [f" p{i}" for i in range(n_prompts)]
        self.candidates = []
        for _ in range(n_prompts):        # 3 distinct 3-token responses (distinct first tokens)
            first = torch.randperm(N_WORDS, generator=g)[:3].tolist()
            rest = torch.randint(0, N_WORDS, (3, 2), generator=g).tolist()
            self.candidates.append([" " + " ".join(f"r{t}" for t in [f, *r]) for f, r in zip(first, rest)])

    def pairs(self, per_prompt, seed):
        """(prompt, chosen, rejected) texts: y1, y2 ~ pi_ref, ties dropped, Bradley-Terry labels
        from r = log pi*; and the (winner, loser) candidate ids per prompt for the tabular theory."""
        g = torch.Generator().manual_seed(seed)
        rows, ids = {"prompt": [], "chosen": [], "rejected": []}, []
        for p, spec in enumerate(self.specs):
            ref, star = torch.tensor(spec["pi_ref"]), torch.tensor(spec["pi_star"], dtype=torch.float64)
            y1 = torch.multinomial(ref, per_prompt, replacement=True, generator=g)
            y2 = torch.multinomial(ref, per_prompt, replacement=True, generator=g)
            keep = y1 != y2
            y1, y2 = y1[keep], y2[keep]
            first = torch.rand(len(y1), generator=g, dtype=torch.float64) < star[y1] / (star[y1] + star[y2])
            w, lo = torch.where(first, y1, y2), torch.where(first, y2, y1)
            ids.append((w, lo))
            for a, b in zip(w.tolist(), lo.tolist()):
                rows["prompt"].append(self.prompts[p])
                rows["chosen"].append(self.candidates[p][a])
                rows["rejected"].append(self.candidates[p][b])
        return rows, ids


def _encode(tokenizer, task):
    """input ids [P*K, L] (prompt, candidate, <eos>), the completion mask, and (P, K)."""
    seqs, masks = [], []
    for p, prompt in enumerate(task.prompts):
        pid = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        for cand in task.candidates[p]:
            cid = tokenizer(cand, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            seqs.append(pid + cid)
            masks.append([0] * len(pid) + [1] * len(cid))
    return torch.tensor(seqs), torch.tensor(masks), (len(task.prompts), 3)


def candidate_logps(model, ids, mask, shape):
    """log p(candidate | prompt) [P, K], every candidate scored exactly."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    tok = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (tok * mask[:, 1:]).sum(-1).view(*shape)


def kl(p, q):
    return float((p * (p.log() - q.clamp_min(1e-300).log())).sum())


def _policy_report(task, logps):
    """(kl_good, kl_bad, mass_out) of a model's candidate log-probs [P, K]."""
    pi = torch.softmax(logps.double(), -1)
    kls = [kl(torch.tensor(s["pi_star"], dtype=torch.float64), pi[p]) for p, s in enumerate(task.specs)]
    good = statistics.mean(k for k, s in zip(kls, task.specs) if s is GOOD)
    bad = statistics.mean(k for k, s in zip(kls, task.specs) if s is BAD)
    return good, bad, float(1 - logps.double().exp().sum(-1).mean())


def train_reference(task, tokenizer, seed, steps=400):
    """SFT to pi_ref: the pi_ref-weighted NLL of every candidate, full batch, Adam."""
    ids, mask, shape = _encode(tokenizer, task)
    model = _model(len(task.vocab), seed)
    weights = torch.tensor([s["pi_ref"] for s in task.specs]).flatten()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        logits = model(input_ids=ids).logits[:, :-1]
        tok = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        (-(weights * (tok * mask[:, 1:]).sum(-1)).sum() / len(task.specs)).backward()
        opt.step()
    model.eval()
    logps = candidate_logps(model, ids, mask, shape)
    pi = torch.softmax(logps.double(), -1)
    ref_kl = statistics.mean(kl(torch.tensor(s["pi_ref"], dtype=torch.float64), pi[p])
                             for p, s in enumerate(task.specs))
    return model, {"kl_ref": ref_kl, "mass_out": float(1 - logps.double().exp().sum(-1).mean())}


def tabular_minimiser(task, ids, loss_type, lam):
    """The exact minimiser of the loss over free per-prompt candidate tables on the same pairs
    (fusedpref.desiderata.Problem's one-hot head, fitted by L-BFGS): (kl_good, kl_bad)."""
    from .desiderata import Problem

    prob = Problem.__new__(Problem)
    prob.prompts = task.specs
    winners = torch.cat([w for w, _ in ids])
    losers = torch.cat([lo for _, lo in ids])
    prompt = torch.cat([torch.full_like(w, p) for p, (w, _) in enumerate(ids)])
    onehot = torch.nn.functional.one_hot(prompt, len(task.specs)).float()
    prob.winners, prob.losers, prob.prompt = winners, losers, prompt
    prob.hidden = torch.cat([onehot, onehot]).unsqueeze(1)
    prob.targets = torch.cat([winners, losers]).unsqueeze(1)
    prob.ref_table = torch.log(torch.tensor([s["pi_ref"] for s in task.specs])).t().contiguous()
    pi = prob.fit(loss_type, lam, "lbfgs", steps=200)
    good, bad, _ = _policy_report(task, pi.double().clamp_min(1e-300).log())
    return good, bad


def train_one(task, tokenizer, ref, data, loss_type, lam, *, steps, lr, batch, seed, patched=True):
    """One DPOTrainer run from the reference; (row fields, median step seconds)."""
    import copy

    import datasets
    from trl import DPOConfig, DPOTrainer

    import fusedpref.integrations.trl as fp_trl

    fp_trl.patch_trl() if patched else fp_trl.unpatch_trl()
    clock, times = fp_trl.step_clock()

    with tempfile.TemporaryDirectory() as out:
        cfg = DPOConfig(output_dir=out, max_steps=steps, report_to=[], logging_steps=1, save_strategy="no",
                        use_cpu=True, learning_rate=lr, lr_scheduler_type="constant", seed=seed, bf16=False,
                        per_device_train_batch_size=batch, loss_type=loss_type, beta=lam, disable_tqdm=True,
                        max_length=32)
        trainer = DPOTrainer(model=copy.deepcopy(ref), ref_model=copy.deepcopy(ref), args=cfg,
                             train_dataset=datasets.Dataset.from_dict(data), processing_class=tokenizer,
                             callbacks=[clock])
        trainer.train()
    fp_trl.unpatch_trl()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    tail = logs[-max(1, len(logs) // 10):]
    ids, mask, shape = _encode(tokenizer, task)
    good, bad, out_mass = _policy_report(task, candidate_logps(trainer.model.eval(), ids, mask, shape))
    head = logs[:max(1, len(logs) // 10)]
    row = {"loss": loss_type, "lam": lam, "kl_good": good, "kl_bad": bad, "mass_out": out_mass,
           "reward_acc": statistics.mean(r["rewards/accuracies"] for r in tail),
           "first_loss": statistics.mean(r["loss"] for r in head),
           "final_loss": statistics.mean(r["loss"] for r in tail)}
    return row, statistics.median(times[1:] or times)


def run(out_dir, seed=0, n_prompts=8, pairs_per_prompt=64, lambdas=LAMBDAS, losses=LOSSES, steps=80, lr=2e-3,
        batch=32, ref_steps=400, tabular=True, quiet=False):
    """The whole experiment; writes DIR/lm.json, DIR/lm.md and (matplotlib) DIR/lm.png."""
    import resource

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    task = Task(n_prompts, seed)
    tokenizer = _tokenizer(task.vocab)
    ref, ref_report = train_reference(task, tokenizer, seed, ref_steps)
    data, ids = task.pairs(pairs_per_prompt, seed + 1)
    rows = []
    for loss_type in losses:
        for lam in lambdas:
            row, _ = train_one(task, tokenizer, ref, data, loss_type, lam, steps=steps, lr=lr, batch=batch, seed=seed)
            if tabular:
                row["theory_kl_good"], row["theory_kl_bad"] = tabular_minimiser(task, ids, loss_type, lam)
            rows.append(row)
            if not quiet:
                print(json.dumps(row), flush=True)
    # whole-step figures from the same setup: patched vs TRL's own head, one configuration
    _, fused_s = train_one(task, tokenizer, ref, data, "sigmoid", lambdas[len(lambdas) // 2], steps=min(steps, 20),
                           lr=lr, batch=batch, seed=seed)
    _, trl_s = train_one(task, tokenizer, ref, data, "sigmoid", lambdas[len(lambdas) // 2], steps=min(steps, 20),
                         lr=lr, batch=batch, seed=seed, patched=False)
    report = {"seed": seed, "reference": ref_report, "pairs": len(data["prompt"]), "rows": rows,
              "step_s": {"fusedpref": fused_s, "trl": trl_s}, "seconds": time.perf_counter() - t0,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    (out / "lm.json").write_text(json.dumps(rows, indent=1))
    (out / "lm_report.json").write_text(json.dumps(report, indent=1))
    (out / "lm.md").write_text(markdown(report))
    _plot(rows, out / "lm.png")
    if not quiet:
        print(markdown(report))
    return report


def markdown(report):
    ref = report["reference"]
    lines = [f"# desiderata on a language model (seed {report['seed']}): reference KL(pi_ref || model) "
             f"{ref['kl_ref']:.4f}, mass outside the candidates {ref['mass_out']:.4f}; {report['pairs']} pairs; "
             f"{report['seconds']:.0f} s, peak RSS {report['peak_rss_mb']:.0f} MB; DPOTrainer step "
             f"{report['step_s']['fusedpref'] * 1e3:.0f} ms patched vs {report['step_s']['trl'] * 1e3:.0f} ms TRL's head",
             "", "| loss | lambda | kl_good | kl_bad | theory kl_good | theory kl_bad | mass_out | reward_acc | "
             "first / final loss |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        th = (f"{r['theory_kl_good']:.4f} | {r['theory_kl_bad']:.4f}" if "theory_kl_good" in r else "- | -")
        lines.append(f"| {r['loss']} | {r['lam']:g} | {r['kl_good']:.4f} | {r['kl_bad']:.4f} | {th} | "
                     f"{r['mass_out']:.4f} | {r['reward_acc']:.2f} | {r['first_loss']:.4f} / {r['final_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def _plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:        # the bench extra; the JSON and the table are written regardless
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=False)
    for ax, key, title in ((axes[0], "kl_good", "good prompts (pi_ref = pi*)"),
                           (axes[1], "kl_bad", "bad prompts (pi_ref != pi*)")):
        for loss in sorted({r["loss"] for r in rows}):
            rs = [r for r in rows if r["loss"] == loss]
            ax.plot([r["lam"] for r in rs], [max(r[key], 1e-4) for r in rs], "o-", label=loss)
            if "theory_" + key in rs[0]:
                ax.plot([r["lam"] for r in rs], [max(r["theory_" + key], 1e-4) for r in rs], ":",
                        color=ax.lines[-1].get_color())
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("lambda (beta)")
        ax.set_ylabel("KL(pi* || pi_theta)")
        ax.set_title(title)
    axes[0].legend(title="dotted: tabular minimiser", fontsize=8, title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="fusedpref desiderata --lm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lm", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="output directory (lm.json, lm.md, lm.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=80, help="DPOTrainer steps per run")
    p.add_argument("--prompts", type=int, default=8, help="prompts (half good, half bad)")
    a = p.parse_args(argv)
    if a.steps < 1 or a.prompts < 2 or a.prompts % 2:
        p.error("--steps must be >= 1 and --prompts an even number >= 2")
    run(a.out, seed=a.seed, n_prompts=a.prompts, steps=a.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
