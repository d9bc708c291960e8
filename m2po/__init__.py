"""m2po: M2PO (second-moment trust policy optimization, arXiv 2510.01161) for verl.

`m2po.algorithm` is plain PyTorch; `m2po.verl_integration` registers the losses into verl and
is imported automatically by `import verl` through the `verl.plugins` entry point.
"""

__version__ = "0.1.0"
