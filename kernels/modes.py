"""The divergence modes of the two-head kernels (the DIV constexpr of kernels/kl.py), as
constexprs the kernels compare against by name; fusedpref._spec.Divergence has the same values
(tests/test_structure.py checks it)."""
import triton.language as tl

FORWARD_KL = tl.constexpr(0)    # KL(q || p): TRL's forward KL, EXPO's KL(pi_ref || pi_theta)
REVERSE_KL = tl.constexpr(1)    # KL(p || q)
JSD = tl.constexpr(2)           # the generalised JSD (the forward's first pass: both log-sum-exps only)
