"""`fusedpref desiderata`: the synthetic tests of the EXPO/TYPO papers, run on fusedpref's losses.

A tabular policy over 3 outputs is written as fusedpref's linear head: one token per sequence
(T=1), the hidden state is the one-hot of the prompt, and the weight [3, n_prompts] is the table of
logits (column p = the logits of prompt p). Preference pairs: y1, y2 uniform over the 3 outputs,
ties dropped, y1 wins with the Bradley-Terry probability pi*(y1) / (pi*(y1) + pi*(y2)). Each loss
(DPO "sigmoid", "ipo", "expo") is trained from the reference policy with
fusedpref.preference_loss for a range of lambda (= beta), both with a fixed Adam budget and to
the exact minimiser (L-BFGS to convergence).

  interpolation: pi* = [0.6, 0.3, 0.1], pi_ref = [0.4, 0.4, 0.2]: the learned policy vs lambda.
  preservation:  two prompts in one dataset, "good" pi* = pi_ref = [0.6, 0.3, 0.1] and "bad"
                 pi* = [0.6, 0.2, 0.2], pi_ref = [0.4, 0.2, 0.4]: KL(pi* || pi_theta) vs log lambda.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

LOSSES = ("sigmoid", "ipo", "expo")
INTERP = {"pi_star": [0.6, 0.3, 0.1], "pi_ref": [0.4, 0.4, 0.2]}
GOOD = {"pi_star": [0.6, 0.3, 0.1], "pi_ref": [0.6, 0.3, 0.1]}
BAD = {"pi_star": [0.6, 0.2, 0.2], "pi_ref": [0.4, 0.2, 0.4]}


def sample_pairs(pi_star, n_draws, generator):
    """(winners, losers) of n_draws Bradley-Terry comparisons between uniform draws, ties dropped."""
    pi = torch.tensor(pi_star, dtype=torch.float64)
    y1 = torch.randint(0, len(pi_star), (n_draws,), generator=generator)
    y2 = torch.randint(0, len(pi_star), (n_draws,), generator=generator)
    keep = y1 != y2
    y1, y2 = y1[keep], y2[keep]
    p1 = pi[y1] / (pi[y1] + pi[y2])
    first_wins = torch.rand(len(y1), generator=generator, dtype=torch.float64) < p1
    return torch.where(first_wins, y1, y2), torch.where(first_wins, y2, y1)


class Problem:
    """Pairs from several prompts as one preference batch for fusedpref.preference_loss."""

    def __init__(self, prompts, n_draws=300, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.prompts = prompts
        ws, ls, ps = [], [], []
        for p, spec in enumerate(prompts):
            w, l = sample_pairs(spec["pi_star"], n_draws, g)
            ws.append(w), ls.append(l), ps.append(torch.full_like(w, p))
        self.winners, self.losers, self.prompt = torch.cat(ws), torch.cat(ls), torch.cat(ps)
        n_p = len(prompts)
        onehot = torch.nn.functional.one_hot(self.prompt, n_p).float()
        self.hidden = torch.cat([onehot, onehot]).unsqueeze(1)                       # [2B, 1, P]
        self.targets = torch.cat([self.winners, self.losers]).unsqueeze(1)           # [2B, 1]
        self.ref_table = torch.log(torch.tensor([s["pi_ref"] for s in prompts])).t().contiguous()  # [3, P]

    def loss(self, table, loss_type, lam):
        import fusedpref

        loss, _ = fusedpref.preference_loss(self.hidden, table, self.targets, loss_type=loss_type, beta=lam,
                                            ref_hidden=self.hidden, ref_weight=self.ref_table, backend="torch")
        return loss

    def fit(self, loss_type, lam, optimizer="lbfgs", steps=400, lr=0.05):
        """The learned policy [P, 3], starting at the reference.

        L-BFGS runs in the coordinates u = s (theta - theta_ref) with s = lam for the DPO-family
        losses, which see theta only through lam (theta - theta_ref): in theta their loss is so
        flat for small lam that fp32 resolution would stop L-BFGS at the start; and the objective
        is divided by its value at the start. The minimiser is the same; only the conditioning
        changes. EXPO's supervised term is not lam-scaled: s = 1.
        """
        if optimizer == "lbfgs":
            scale = 1.0 if loss_type == "expo" else lam
            u = torch.zeros_like(self.ref_table, requires_grad=True)
            opt = torch.optim.LBFGS([u], lr=1, max_iter=steps, history_size=50, tolerance_grad=1e-7,
                                    tolerance_change=1e-10, line_search_fn="strong_wolfe")

            with torch.no_grad():   # the objective divided by its start value (IPO starts at ~1/(4 lam^2))
                norm = float(self.loss(self.ref_table, loss_type, lam))

            def closure():
                opt.zero_grad()
                loss = self.loss(self.ref_table + u / scale, loss_type, lam) / norm
                loss.backward()
                return loss
            best = float("inf")
            for _ in range(5):   # restarts until L-BFGS stops making progress
                before = u.detach().clone()
                try:
                    opt.step(closure)
                except RuntimeError:   # a line search overflowing on fp32 noise: keep the last point
                    u.data.copy_(before)
                    break
                with torch.no_grad():
                    now = float(self.loss(self.ref_table + u / scale, loss_type, lam)) / norm
                if not math.isfinite(now):
                    u.data.copy_(before)
                    break
                if not now < best - 1e-9:
                    break
                best = now
            return torch.softmax((self.ref_table + u.detach() / scale).t().double(), dim=-1)
        table = self.ref_table.clone().requires_grad_()
        if optimizer == "adam":
            opt = torch.optim.Adam([table], lr=lr)
            for _ in range(steps):
                opt.zero_grad()
                self.loss(table, loss_type, lam).backward()
                opt.step()
        else:
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
        return torch.softmax(table.detach().t().double(), dim=-1)


def kl(p, q):
    p, q = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(q, dtype=torch.float64)
    return float((p * (p.log() - q.clamp_min(1e-300).log())).sum())


def bt_mle(winners, losers, k=3, iters=2000):
    """Bradley-Terry maximum likelihood by Hunter's MM iteration (independent of fusedpref)."""
    wins = torch.bincount(winners, minlength=k).double()
    n = torch.zeros(k, k, dtype=torch.float64)
    for w, l in zip(winners.tolist(), losers.tolist()):
        n[w, l] += 1
        n[l, w] += 1
    p = torch.full((k,), 1.0 / k, dtype=torch.float64)
    for _ in range(iters):
        denom = (n / (p[:, None] + p[None, :])).sum(1)
        p = wins / denom
        p = p / p.sum()
    return p


def run(out_dir, lambdas=None, log_lambdas=None, adam_steps=300, lbfgs_steps=200, quiet=False):
    torch.manual_seed(0)
    lambdas = lambdas or [10.0 ** e for e in range(-5, 3)]
    log_lambdas = log_lambdas or list(range(-5, 6))
    t0 = time.time()
    interp = Problem([INTERP], n_draws=300, seed=0)
    mle = bt_mle(interp.winners, interp.losers)
    rows = []
    for opt in ("adam", "lbfgs"):
        for lt in LOSSES:
            for lam in lambdas:
                pi = interp.fit(lt, lam, opt, adam_steps if opt == "adam" else lbfgs_steps)[0]
                rows.append({"test": "interpolation", "optimizer": opt, "loss": lt, "lambda": lam,
                             "pi": [round(x, 4) for x in pi.tolist()], "kl_star": kl(INTERP["pi_star"], pi)})
    pres = Problem([GOOD, BAD], n_draws=300, seed=1)
    for opt in ("adam", "lbfgs"):
        for lt in LOSSES:
            for ll in log_lambdas:
                pi = pres.fit(lt, math.exp(ll), opt, adam_steps if opt == "adam" else lbfgs_steps)
                rows.append({"test": "preservation", "optimizer": opt, "loss": lt, "log_lambda": ll,
                             "kl_good": kl(GOOD["pi_star"], pi[0]), "kl_bad": kl(BAD["pi_star"], pi[1]),
                             "pi_good": [round(x, 4) for x in pi[0].tolist()],
                             "pi_bad": [round(x, 4) for x in pi[1].tolist()]})
    if not quiet:
        print_tables(rows, mle)
        print(f"# {time.time() - t0:.1f} s")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        plot(rows, mle, out_dir)
        if not quiet:
            print(f"# wrote {out_dir}/desiderata_interpolation.png, {out_dir}/desiderata_preservation.png")
    return rows, mle


def print_tables(rows, mle):
    print(f"# interpolation: pi* = {INTERP['pi_star']}, pi_ref = {INTERP['pi_ref']}, "
          f"Bradley-Terry MLE of the sampled data = {[round(x, 4) for x in mle.tolist()]}")
    print("| optimizer | loss | lambda | learned policy | KL(pi* || pi) |")
    print("|---|---|---|---|---|")
    for r in rows:
        if r["test"] == "interpolation":
            print(f"| {r['optimizer']} | {r['loss']} | {r['lambda']:.0e} | {r['pi']} | {r['kl_star']:.4f} |")
    print("\n# preservation: KL(pi* || pi_theta) on the good prompt (pi* = pi_ref) / the bad prompt")
    print("| optimizer | loss | " + " | ".join(f"ln λ={ll}" for ll in sorted({r['log_lambda'] for r in rows
                                                                            if r['test'] == 'preservation'})) + " |")
    print("|---|---|" + "---|" * len({r['log_lambda'] for r in rows if r['test'] == 'preservation'}))
    for opt in ("adam", "lbfgs"):
        for lt in LOSSES:
            cells = [f"{r['kl_good']:.3f} / {r['kl_bad']:.3f}" for r in rows
                     if r["test"] == "preservation" and r["optimizer"] == opt and r["loss"] == lt]
            print(f"| {opt} | {lt} | " + " | ".join(cells) + " |")


def plot(rows, mle, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["tab:blue", "tab:orange", "tab:green"]
    fig, axes = plt.subplots(2, len(LOSSES), figsize=(13, 7), sharey=True)
    for i, opt in enumerate(("adam", "lbfgs")):
        for j, lt in enumerate(LOSSES):
            ax = axes[i, j]
            sel = [r for r in rows if r["test"] == "interpolation" and r["optimizer"] == opt and r["loss"] == lt]
            xs = [math.log10(r["lambda"]) for r in sel]
            for k in range(3):
                ax.plot(xs, [r["pi"][k] for r in sel], marker="o", color=colors[k], label=f"π(y{k + 1})")
                ax.axhline(INTERP["pi_star"][k], color=colors[k], ls="--", lw=1)
                ax.axhline(INTERP["pi_ref"][k], color=colors[k], ls=":", lw=1)
            ax.set_title(f"{lt} ({'Adam, fixed budget' if opt == 'adam' else 'L-BFGS, exact minimiser'})")
            ax.set_xlabel("log10 λ")
            ax.grid(alpha=0.3)
        axes[i, 0].set_ylabel("learned policy   (-- π*, ··· π_ref)")
    axes[0, 0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "desiderata_interpolation.png"), dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, key, title in ((axes[0], "kl_good", "good prompt (π* = π_ref)"), (axes[1], "kl_bad", "bad prompt")):
        for j, lt in enumerate(LOSSES):
            for opt, ls in (("lbfgs", "-"), ("adam", "--")):
                sel = [r for r in rows if r["test"] == "preservation" and r["optimizer"] == opt and r["loss"] == lt]
                ax.plot([r["log_lambda"] for r in sel], [r[key] for r in sel], ls=ls, marker="o", ms=3,
                        color=colors[j], label=f"{lt} ({'L-BFGS' if opt == 'lbfgs' else 'Adam'})")
        ax.set(xlabel="ln λ", ylabel="KL(π* || π_θ)", title=title, yscale="symlog")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "desiderata_preservation.png"), dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="fusedpref desiderata", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="desiderata_out", help="directory for the PNG figures")
    p.add_argument("--adam-steps", type=int, default=300)
    p.add_argument("--lbfgs-steps", type=int, default=200)
    a = p.parse_args(argv)
    run(a.out, adam_steps=a.adam_steps, lbfgs_steps=a.lbfgs_steps)


if __name__ == "__main__":
    main(sys.argv[1:])
