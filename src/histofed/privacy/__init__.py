"""Privacy: differential-privacy mechanism (dp.py), accountants with persisted history
(accountant.py) and the gradient-inversion audit (invert.py). Import the submodules directly."""
